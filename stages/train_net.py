"""``train-net``: train an end-to-end network of the registry (``--net stmult``: [ST-Mult]) and test it.

The network (:data:`pipeline.models.networks.NETWORKS`) starts from this pipeline's ``finetune`` checkpoints of
the same split (``finetune/split<k>-<arch>/<stream>``, each stream's ``--arch`` its own: ``--rgb-arch`` /
``--flow-arch``, default the scope's ``--backbone``), reads decode's frames and extract-flow's flow, trains with
the one loop (:func:`pipeline.training.loop.fit`; the network parts in :mod:`pipeline.training.networks`):
``--batch-size`` videos per step in micro-batches of ``--micro-batch`` (BatchNorm statistics per micro-batch),
the step schedule of [ST-Mult] §4.1 (or the plateau one), ``best.pt`` by validation accuracy on decode's
hold-out, resume from ``last.pt`` after a kill, DDP under ``torchrun``. Then the test videos with the network's
protocol ([ST-Mult] §4.2: 25 frames and their flips, fully convolutional over the whole frame).

Outputs in ``<cache>/train-net/<scope>/<name>/`` (the scope: ``split<k>-<arch>``, or ``split<k>-<rgb>+<flow>``
when the streams' archs differ; the name from the effective options, ``stmult-s0``): ``best.pt``, ``last.pt``,
``history.csv``, ``curves.png``, ``confusion.png``, ``test_scores.npz`` (read by ``evaluate`` and ``report``
like every row) and ``results.json``. A video too short for the network or unreadable is recorded as a failure
with its reason (the run then exits non-zero unless ``--allow-failures``), never a crash. docs/networks.md
describes the network and docs/training.md the training.

Examples:

\b
    pipeline train-net --net stmult
    pipeline train-net --net stmult --temporal-init avg --rgb-arch resnet50 --flow-arch resnet152
    torchrun --standalone --nproc-per-node 4 -m stages train-net --net stmult --checkpointing
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.clips import SplitVideos, VideoList, split_videos
from pipeline.data.table import VideoTable
from pipeline.eval.metrics import accuracy_metrics
from pipeline.eval.results import TestScores, save_test_scores
from pipeline.flow.stored import flow_settings, note_without_flow, without_flow
from pipeline.io import artifacts
from pipeline.io.atomic import write_json
from pipeline.models.backbones import backbone_info
from pipeline.models.networks import (DEFAULT_NETWORK, NETWORKS, NetworkOptionError, Source, create_network,
                                      list_networks, network_options, network_output_name, option_fields,
                                      result_options)
from pipeline.stage import Plan, Stage, StageContext, StageError, Upstream, digest, param, params_dict
from pipeline.stage.validate import option_name

VERSION = "1"


def _steps(value: tuple[int, ...]) -> str | None:
    if list(value) != sorted(set(value)):
        return "must be increasing epoch counts, e.g. 20,30"
    return None


@dataclass(frozen=True)
class _TrainNetBase:
    net: str = param(DEFAULT_NETWORK, "End-to-end network: stmult ([ST-Mult], motion gating inside two ResNets).",
                     choices=list_networks())
    split: int = param(1, "Split of the finetune outputs the network starts from; it trains and tests on it.",
                       scope="split", min=1)
    backbone: str = param(artifacts.DEFAULT_BACKBONE, "Backbone of both streams' finetune outputs (finetune "
                          "--arch), unless --rgb-arch / --flow-arch name others.", scope="backbone")
    rgb_arch: str | None = param(None, "Backbone of the appearance stream (finetune/split<k>-<arch>/rgb); "
                                 "default --backbone. [ST-Mult] §5.3's best: resnet50.")
    flow_arch: str | None = param(None, "Backbone of the motion stream (finetune/split<k>-<arch>/flow); default "
                                  "--backbone. [ST-Mult] §5.3's best: resnet152.")
    input_size: int = param(0, "Training crop side in pixels; 0: the finetune checkpoints' ([ST-Mult] §4.1: "
                            "224). Tests use the whole frame at short side round(size * 256 / 224).",
                            min=1, also=(0,))
    batch_size: int = param(128, "Videos per SGD step over all ranks ([ST-Mult] §4.1: 128).", min=1)
    micro_batch: int = param(4, "Videos per forward/backward pass on one rank, and so per BatchNorm batch "
                             "([ST-Mult] §4.1: small, the authors' 4); gradients accumulate to --batch-size.",
                             min=1)
    lr: float = param(1e-3, "Initial learning rate ([ST-Mult] §4.1: 1e-3).", min=0.0, min_exclusive=True)
    momentum: float = param(0.9, "SGD momentum (not stated; the released code's 0.9).", min=0.0, max=1.0,
                            max_exclusive=True)
    weight_decay: float = param(5e-4, "Weight decay on conv and linear weights (not stated; MatConvNet's "
                                "default 5e-4, as finetune).", min=0.0)
    schedule: str = param("step", "Learning-rate schedule: step (divide by 10 after each --lr-steps epoch, "
                          "[ST-Mult] §4.1) or plateau (after --patience epochs without a lower validation "
                          "error, as finetune).", choices=("step", "plateau"))
    lr_steps: tuple[int, ...] = param((20, 30), "Step schedule: epochs after which the learning rate is "
                                      "divided by 10 ([ST-Mult] §4.1: after 20, then 10 more).", min=1,
                                      check=_steps)
    patience: int = param(3, "Plateau schedule: epochs without a lower validation error before dividing.", min=0)
    lr_decays: int = param(2, "Plateau schedule: stop at the first plateau after this many divisions.", min=0)
    epochs: int = param(40, "Epochs in all (the paper stops at no stated epoch; 40: 10 at the last rate).",
                        min=1)
    seed: int = param(0, "Seed of the data order, sampling, augmentation and dropout.")
    workers: int = param(-1, "DataLoader worker processes per rank (-1: auto, 0: load in the main process).",
                         fingerprint=False, min=0, also=(-1,))
    device: str = param("auto", "auto (CUDA when available), cpu or cuda.", fingerprint=False,
                        choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "bf16 autocast on CUDA (ignored on CPU).", fingerprint=False)
    tensorboard: bool = param(False, "Write per-epoch loss, accuracy and lr for TensorBoard to "
                              "<output>/tensorboard/.", fingerprint=False)

    @property
    def archs(self) -> dict[str, str]:
        """The finetune arch of each stream."""
        return {"rgb": self.rgb_arch or self.backbone, "flow": self.flow_arch or self.backbone}

    def validate(self) -> None:
        """The checks across parameters (each parameter's own are declared with it)."""
        effective_options(self)


#: Every network option, one field each (None = not given: the network's default applies), generated from
#: the registry so that a network added there gets its options here without editing this stage.
OPTION_FIELDS = option_fields()
_clash = sorted(set(OPTION_FIELDS) & {f.name for f in dataclasses.fields(_TrainNetBase)})
if _clash:
    raise ImportError(f"network option(s) {_clash} are named like train-net parameters; rename them in the "
                      "registry (pipeline.models.networks)")

TrainNetParams = dataclasses.make_dataclass(
    "TrainNetParams",
    [(name, rec["type"] | None, param(None, rec["help"], fingerprint=False, **rec["checks"]))
     for name, rec in OPTION_FIELDS.items()],
    bases=(_TrainNetBase,), frozen=True)
TrainNetParams.__module__ = __name__
TrainNetParams.__doc__ = ("train-net's parameters: the run's (``_TrainNetBase``) and one per network option "
                          "(:data:`OPTION_FIELDS`).")


def given_options(p) -> dict:
    """The network options given (not None) in ``p``."""
    return {k: getattr(p, k) for k in OPTION_FIELDS if getattr(p, k) is not None}


def effective_options(p) -> dict:
    """The network's defaults updated with the given options; one it does not take is a StageError naming it."""
    try:
        return network_options(p.net, given_options(p))
    except NetworkOptionError as e:
        raise StageError(f"{option_name(e.option)}: {e}") from None
    except ValueError as e:
        raise StageError(str(e)) from None


def net_name(p) -> str:
    """The output name: :func:`pipeline.models.networks.network_output_name` of the options (``stmult-s0``)."""
    effective_options(p)  # the clear error first
    return network_output_name(p.net, given_options(p), seed=p.seed)


def scope_backbone(p) -> str:
    """The scope's backbone: the arch of the network's streams, ``<rgb>+<flow>`` when they differ."""
    archs = [p.archs[s] for s in NETWORKS[p.net].streams]
    if len(set(archs)) == 1:
        return archs[0]
    return artifacts.pair_backbone(p.archs["rgb"], p.archs["flow"])


def _key(p) -> str:
    return artifacts.net_key(net_name(p), p.split, scope_backbone(p))


def _upstream(p) -> tuple[str, ...]:
    from pipeline.training.networks import INPUTS

    spec = NETWORKS[p.net]
    keys = [artifacts.DECODE] + [INPUTS[i].key(p.split, scope_backbone(p)) for i in spec.inputs]
    keys += [artifacts.finetune_key(s, p.split, p.archs[s]) for s in spec.streams]
    return tuple(dict.fromkeys(keys))


# ----------------------------------------------------------------------------------------------------------
# Plan: everything checked before work starts
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Data:
    classes: list[str]
    videos: SplitVideos
    inputs: object  # pipeline.training.networks.Inputs
    options: dict
    sources: dict  # stream -> {"arch", "in_channels", "path"}
    states: dict  # stream -> finetune "model" state dict
    input_size: int
    left_out: dict  # video -> why it has no flow (extract-flow's accepted failures)

    @property
    def train(self) -> VideoList:
        return self.videos.train

    @property
    def val(self) -> VideoList:
        return self.videos.val

    @property
    def test(self) -> VideoList:
        return self.videos.test


def plan(p, upstream: Upstream) -> Plan:
    import torch

    from pipeline.training import loop as T
    from pipeline.training.networks import INPUTS, Inputs

    spec = NETWORKS[p.net]
    options = effective_options(p)
    T.check_plan(tensorboard=p.tensorboard, batch_size=p.batch_size)
    decode_dir = upstream.dir(artifacts.DECODE)
    table = VideoTable.load(decode_dir)
    try:
        videos = split_videos(table, p.split)
    except ValueError as e:
        raise StageError(f"{decode_dir / artifacts.TABLE}: {e}") from None

    sources, states, sizes = {}, {}, {}
    for s in spec.streams:
        key = artifacts.finetune_key(s, p.split, p.archs[s])
        try:
            path, ck = artifacts.finetune_checkpoint(upstream.dir(key), table.classes)
        except artifacts.ArtifactError as e:
            raise StageError(str(e)) from None
        trained = (upstream.manifests[key].params or {}).get("split")
        if trained is not None and int(trained) != p.split:
            raise StageError(f"{upstream.dir(key)}: trained on split {trained}, train-net --split {p.split} asked")
        if ck.get("stream", s) != s:
            raise StageError(f"{path}: a finetune checkpoint of the {ck['stream']} stream, found as {s}")
        sources[s] = {"arch": ck["arch"], "in_channels": int(ck["in_channels"]), "path": str(path)}
        states[s] = ck["model"]
        sizes[s] = int(ck.get("input_size") or (ck.get("params") or {}).get("input_size") or 224)
    if p.input_size:
        input_size = p.input_size
    elif len(set(sizes.values())) == 1:
        input_size = next(iter(sizes.values()))
    else:
        raise StageError(f"the finetune checkpoints were trained at different input sizes {sizes}; give "
                         "--input-size (one crop for both streams)")
    for s, src in sources.items():
        need = backbone_info(src["arch"])["min_input_size"]
        if input_size < need:
            raise StageError(f"{src['arch']} ({s}) needs --input-size >= {need} (got {input_size})")

    stores = {i: INPUTS[i].open(upstream.dir(INPUTS[i].key(p.split, scope_backbone(p)))) for i in spec.inputs}
    flow, left_out = {}, {}
    if "flow" in spec.inputs:
        try:  # the flow store's bound and step, as extract-flow recorded them (every container is checked);
            # the videos extract-flow failed (and accepted) have no flow: left out, as finetune and refine do
            bound, step = flow_settings(upstream.manifests[artifacts.FLOW], upstream.dir(artifacts.FLOW))
            videos, left_out = without_flow(videos, upstream.manifests[artifacts.FLOW], upstream.dir(artifacts.FLOW))
        except ValueError as e:
            raise StageError(str(e)) from None
        flow = {"flow_bound": bound, "flow_step": step}
    flow_length = sources["flow"]["in_channels"] // 2 if "flow" in sources else 10
    inputs = Inputs(stores, flow_length=flow_length, **flow)

    # The configuration, checked without weights (a meta-device build: no memory, no RNG): e.g. the motion gate
    # needs equal stage widths, so ResNet-18 cannot gate ResNet-50.
    try:
        with torch.device("meta"):
            create_network(p.net, num_classes=len(table.classes),
                           sources={s: Source(v["arch"], v["in_channels"]) for s, v in sources.items()}, **options)
    except ValueError as e:
        streams = ", ".join(f"{s} {v['arch']}" for s, v in sources.items())
        raise StageError(f"--net {p.net} on {streams}: {e}") from None

    data = _Data(list(table.classes), videos, inputs, options, sources, states, input_size, left_out)
    inputs_digest = digest({
        "classes": table.classes, "train": data.train.video_ids, "val": data.val.video_ids,
        "test": data.test.video_ids, "labels": list(data.train.labels + data.test.labels),
        "frames": list(data.train.num_frames + data.test.num_frames), "net_options": result_options(p.net, options),
        "sources": {s: {k: v for k, v in src.items() if k != "path"} for s, src in sources.items()},
        "input_size": input_size, "flow_length": flow_length})
    streams = " + ".join(f"{v['arch']} {s}" for s, v in sources.items())
    describe = (f"{p.net} on {streams} at {input_size}px, {len(table.classes)} classes, {len(data.train)} train / "
                f"{len(data.val)} val / {len(data.test)} test videos")
    return Plan(inputs_digest, data, describe)


# ----------------------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------------------

def _checkpoint_meta(p, data: _Data) -> dict:
    return {"net": p.net, "net_options": data.options, "sources": data.sources, "num_classes": len(data.classes),
            "classes": list(data.classes), "input_size": data.input_size,
            "flow_length": data.inputs.flow_length, "params": params_dict(p)}


#: What a checkpoint left by a killed run must share with this run to be resumed.
RESUME_KEYS = ("net", "sources", "num_classes", "classes", "input_size")


def run(ctx: StageContext, plan: Plan) -> dict:
    import torch

    from pipeline.eval.plots import confusion_matrix_plot, training_curves
    from pipeline.training import loop as T
    from pipeline.training.networks import TrainSettings, probe_videos, train_network

    p = ctx.params
    data: _Data = plan.data
    spec = NETWORKS[p.net]
    meta = _checkpoint_meta(p, data)
    info, device, ckpt = T.start_run(ctx, p.device, meta, RESUME_KEYS)
    t0 = time.perf_counter()

    # Videos the network cannot use (too short, unreadable) are failures with their reason, left out of every part.
    bad = {}
    for part in (data.train, data.val, data.test):
        bad.update(probe_videos(data.inputs, part, spec.min_frames))
    if info.is_main:
        for vid, why in bad.items():
            ctx.journal.record_failure(vid, why)
        if bad:
            ctx.log.warning("train-net: %d video(s) left out: %s", len(bad),
                            "; ".join(f"{v} ({w})" for v, w in list(bad.items())[:5]))
    try:
        videos = data.videos.without(bad)
    except ValueError as e:
        raise StageError(f"{e} ({len(bad)} failed, e.g. {next(iter(bad.items()))})") from None
    train, val, test = videos.train, videos.val, videos.test
    if data.left_out:
        note_without_flow(ctx.log, data.left_out)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        model = create_network(p.net, num_classes=len(data.classes), **data.options,
                               sources={s: Source(v["arch"], v["in_channels"], data.states[s])
                                        for s, v in data.sources.items()})
    schedule = T.Schedule(lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, patience=p.patience,
                          lr_decays=p.lr_decays, epochs=p.epochs, seed=p.seed,
                          milestones=tuple(p.lr_steps) if p.schedule == "step" else ())
    settings = TrainSettings(input_size=data.input_size, batch_size=p.batch_size, micro_batch=p.micro_batch,
                             schedule=schedule, workers=p.workers, amp=p.amp, tensorboard=p.tensorboard,
                             name=f"train-net {ctx.dir.name}")
    res = train_network(model, spec, data.options, data.inputs, train=train, val=val, test=test,
                        num_classes=len(data.classes), settings=settings, device=device, info=info, out=ctx.dir,
                        meta=meta, ckpt=ckpt, log=ctx.log)
    for i, why in res.failed.items():  # every rank journals its own test videos
        ctx.journal.record_failure(test.video_ids[i], f"unreadable at test: {why}")
    if not info.is_main:
        return {}
    seconds = time.perf_counter() - t0

    scored = res.scored.numpy()
    ids = np.asarray(test.video_ids)[scored]
    labels = np.asarray(test.labels, dtype=np.int64)[scored]
    ts = TestScores(res.probs.numpy()[scored], ids, labels, data.classes)
    ev = accuracy_metrics(ts.scores, ts.labels, data.classes)
    save_test_scores(ctx.dir / artifacts.SCORES, ts, net=np.array(p.net))
    for vid, label, pred in zip(ids, labels, ts.scores.argmax(1)):
        ctx.journal.record_ok(str(vid), label=int(label), pred=int(pred))
    history, best = res.history, res.best
    epoch_s = [h["seconds"] for h in history]
    results = {
        "name": ctx.dir.name, "net": p.net, "net_options": data.options, "params": params_dict(p), **ev.as_dict(),
        "videos": {"train": len(train), "val": len(val), "test": len(test), "failed": len(bad) + len(res.failed),
                   "without_flow": len(data.left_out)},
        "left_out": data.left_out,
        "val_video_ids": list(val.video_ids), "input_size": data.input_size,
        "backbones": {s: v["arch"] for s, v in data.sources.items()}, "epochs": res.epochs,
        "best_epoch": best.get("epoch"), "lr_decays": res.decays,
        "seconds_per_epoch": float(np.median(epoch_s)) if epoch_s else None, "history": history,
        "device": str(device), "world_size": info.world_size, "seconds": seconds,
    }
    write_json(ctx.dir / artifacts.RESULTS, results)
    key = _key(p)
    if history:
        training_curves(history, ctx.dir / artifacts.CURVES, title=key)
    confusion_matrix_plot(ev.confusion, data.classes, ctx.dir / artifacts.CONFUSION,
                          title=f"{key}: top-1 {100 * ev.top1:.1f}%")
    line = (f"{key}: top-1 {100 * ev.top1:.1f}%, mean class accuracy {100 * ev.mean_class_accuracy:.1f}% on "
            f"{len(ids)} test videos (chance {100 / len(data.classes):.1f}%); {res.epochs} epochs, best "
            f"{best.get('epoch')}, {results['seconds_per_epoch'] or 0:.1f} s/epoch, {seconds:.0f} s on {device}"
            + (f"; {len(data.left_out)} video(s) without flow left out" if data.left_out else ""))
    ctx.log.info(line)
    return {"line": line, "top1": ev.top1, "mean_class_accuracy": ev.mean_class_accuracy, "epochs": res.epochs,
            "best_epoch": best.get("epoch"), "test_videos": len(ids),
            "seconds_per_epoch": results["seconds_per_epoch"], "seconds": seconds, "left_out": data.left_out}


STAGE = Stage(
    name=artifacts.TRAIN_NET, version=VERSION, params_type=TrainNetParams, plan=plan, run=run, upstream=_upstream,
    key=_key, help="Train an end-to-end network (ST-Multiplier [ST-Mult]) from the finetune outputs, and test it.",
)
