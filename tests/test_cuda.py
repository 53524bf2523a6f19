"""The CUDA paths against their CPU references (marked ``cuda``; skipped without a GPU).

Run on the GPU machine by ``bench/gpu_check.py`` (section ``tests``) or directly:
``python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py``. Each test computes the same thing on the
CPU in float32 (the reference) and on CUDA, and bounds the difference by what the CUDA arithmetic allows
(float32 / TF32: ~1e-3 relative; bf16 autocast: ~1e-2).
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / "bench" / "data" / "gpu_check.npz"


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pairs(n: int):
    """Real 340x256 gray pairs (carried by bench/make_gpu_check_data.py), else smooth shifted textures."""
    if CARRIED.is_file():
        d = np.load(CARRIED)
        return d["pairs0"][:n], d["pairs1"][:n]
    return _bench("gpu_check")._synthetic_pairs(n, 256, 340)


def test_tvl1_cuda_matches_cpu_eager_on_real_pairs():
    from pipeline.flow.tvl1 import TVL1Params, tvl1_flow

    i0, i1 = _pairs(2)
    a, b = torch.from_numpy(i0).float(), torch.from_numpy(i1).float()
    params = TVL1Params()
    ref = tvl1_flow(a, b, params, fast=False)
    ours = tvl1_flow(a.cuda(), b.cuda(), params).cpu()
    assert ours.shape == ref.shape and torch.isfinite(ours).all()
    epe = (ours - ref).double().pow(2).sum(1).sqrt()
    # same algorithm and stopping rule: float rounding may tip a median or a pair's last iteration locally
    assert float(epe.mean()) < 0.05, float(epe.mean())
    assert float(torch.quantile(epe.flatten(), 0.99)) < 0.5


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-stores")
    return _bench("features").make_stores(root, 2, 20, height=72, width=96, backend="h5", threads=2)


@pytest.mark.parametrize("amp, tol", [(False, 1e-2), (True, 5e-2)])  # TF32 convolutions; bf16
def test_features_cuda_match_cpu(stores, amp, tol):
    """The engine on CUDA (nvJPEG decode, channels_last, bf16 autocast) against the CPU float32 run."""
    from pipeline.features import StreamSource, build_backbone, features_of_video

    fstore, flstore, jobs = stores
    src = {"rgb": StreamSource("rgb", "resnet18", "none", None, None, 3, 64, 0, 512),
           "flow": StreamSource("flow", "resnet18", "none", None, None, 20, 64, 10, 512)}
    cpu_models = {s: build_backbone(x, "cpu") for s, x in src.items()}
    gpu_models = {s: copy.deepcopy(m).cuda() for s, m in cpu_models.items()}
    if amp:
        gpu_models = {s: m.to(memory_format=torch.channels_last) for s, m in gpu_models.items()}
    kw = dict(num_positions=6, views=1, dtype="float32", batch_size=8, amp=amp)
    for vid, n in jobs:
        ref = features_of_video(vid, n, fstore, flstore, src, cpu_models, device="cpu", **kw)
        got = features_of_video(vid, n, fstore, flstore, src, gpu_models, device="cuda", **kw)
        for s in ("rgb", "flow"):
            assert got.features[s].shape == ref.features[s].shape
            assert _rel(torch.from_numpy(got.features[s]), torch.from_numpy(ref.features[s])) < tol, s


def _tiny_batches(stream_channels: int = 3, n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randint(0, 256, (4, 2, stream_channels, 64, 64), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, 5, (4,), generator=g)} for _ in range(n)]


def _update(model: nn.Module, before: dict[str, torch.Tensor]) -> torch.Tensor:
    """All parameters' change in one step, as one float64 CPU vector."""
    return torch.cat([(p.detach().double().cpu() - before[n].double()).flatten()
                      for n, p in model.named_parameters()])


def test_one_finetune_step_cuda_matches_cpu():
    """bf16 autocast + channels_last on CUDA against the CPU float32 step: same loss, same update."""
    from pipeline.models.backbones import create_backbone, normalize_rgb
    from pipeline.training import loop as T

    torch.manual_seed(0)
    cpu = create_backbone("resnet18", num_classes=5, weights="none", dropout=0.0)
    gpu = copy.deepcopy(cpu).cuda().to(memory_format=torch.channels_last)
    before = {n: p.detach().clone() for n, p in cpu.named_parameters()}
    batches = _tiny_batches(n=1)
    st_cpu = T.train_one_epoch(cpu, batches, torch.optim.SGD(cpu.parameters(), lr=0.01), device=torch.device("cpu"),
                               loss_fn=T.segment_consensus_loss(normalize_rgb))
    st_gpu = T.train_one_epoch(gpu, batches, torch.optim.SGD(gpu.parameters(), lr=0.01),
                               device=torch.device("cuda"), loss_fn=T.segment_consensus_loss(normalize_rgb, True))
    assert st_gpu["samples"] == st_cpu["samples"] == 4
    assert st_gpu["loss"] == pytest.approx(st_cpu["loss"], rel=3e-2)
    assert all(torch.isfinite(p).all() for p in gpu.parameters())
    ref = _update(cpu, before)
    assert float(ref.norm()) > 0
    assert _rel(_update(gpu, before), ref) < 0.1  # bf16 gradients


def test_one_head_epoch_cuda_matches_cpu():
    from pipeline.models.heads import create_head
    from pipeline.training.heads import predict_views, train_head_epoch

    g = torch.Generator().manual_seed(0)
    v, p, d = 96, 25, 64
    rgb, flow = torch.randn(v, p, d, generator=g), torch.randn(v, p, d, generator=g)
    labels = torch.randint(0, 7, (v,), generator=g)
    torch.manual_seed(0)
    cpu = create_head("stfn", num_classes=7, rgb_dim=d, flow_dim=d, num_segments=7)
    gpu = copy.deepcopy(cpu).cuda()
    cpu.eval(), gpu.eval()  # compare without dropout: train_head_epoch sets train mode, so disable it by hand
    for m in list(cpu.modules()) + list(gpu.modules()):
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    kw = dict(num_segments=7, batch_size=32)
    loss_cpu = train_head_epoch(cpu, torch.optim.RMSprop(cpu.parameters(), lr=1e-4), rgb, flow, labels,
                                generator=torch.Generator().manual_seed(1), **kw)
    loss_gpu = train_head_epoch(gpu, torch.optim.RMSprop(gpu.parameters(), lr=1e-4), rgb.cuda(), flow.cuda(),
                                labels.cuda(), generator=torch.Generator().manual_seed(1), **kw)
    assert loss_gpu == pytest.approx(loss_cpu, rel=1e-3)
    pv_cpu = predict_views(cpu, rgb, flow, 7)
    pv_gpu = predict_views(gpu, rgb.cuda(), flow.cuda(), 7)
    assert pv_gpu.device.type == "cpu" and pv_gpu.shape == pv_cpu.shape == (v, 5, 7)
    assert _rel(pv_gpu, pv_cpu) < 1e-2


def test_one_rank_nccl_ddp_step_matches_plain_training(tmp_path):
    """A 1-rank process group (gloo for CPU tensors, NCCL for CUDA ones, as pipeline.dist sets up): DDP with
    global batch norm and EpochBatches' global batch sizes, against the same step without DDP."""
    import torch.distributed as dist

    from pipeline.models.backbones import create_backbone, normalize_rgb
    from pipeline.training import loop as T

    torch.manual_seed(0)
    plain = create_backbone("resnet18", num_classes=5, weights="none", dropout=0.0).cuda()
    model = copy.deepcopy(plain)
    before = {n: p.detach().cpu().clone() for n, p in plain.named_parameters()}
    data = _tiny_batches(n=1)[0]

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            i, _ = key
            return {"input": data["input"][i], "label": data["label"][i]}

    sampler = T.EpochBatches(4, 4, shuffle=False)
    loader = torch.utils.data.DataLoader(Clips(), batch_sampler=sampler)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert T.sync_batchnorm(model) > 0
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
        st = T.train_one_epoch(ddp, loader, torch.optim.SGD(ddp.parameters(), lr=0.01), device=torch.device("cuda"),
                               loss_fn=T.segment_consensus_loss(normalize_rgb))
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
    ref = T.train_one_epoch(plain, [data], torch.optim.SGD(plain.parameters(), lr=0.01), device=torch.device("cuda"),
                            loss_fn=T.segment_consensus_loss(normalize_rgb))
    assert st["samples"] == 4 and st["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    upd_ddp, upd_plain = _update(model, before), _update(plain, before)
    assert float(upd_plain.norm()) > 0
    assert _rel(upd_ddp, upd_plain) < 1e-3  # float32 both; batch statistics summed vs cuDNN's
