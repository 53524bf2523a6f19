"""The Spatiotemporal Pyramid Network ([STPN] §3, Fig. 2) on last-conv maps, and end to end.

Inputs are the last convolutional maps of the two streams (ResNet ``layer4``, 2048 x 7 x 7 at 224 px): the
appearance map ``A`` (B, Ca, H, W) of the RGB frame t and the motion maps ``M_k`` (B, K, Cm, H, W) of K flow
stacks centred at t + j tau (``pipeline.data.sampling.path_centres``), all through ONE shared motion network.
The pyramid ([STPN] §3.4) uses STCB (:class:`~pipeline.models.stcb.CompactBilinear`, Algorithm 1) three times:

1. temporal fusion (§3.2): ``T = STCB_1(M_1, ..., M_K)`` at each location, (B, temporal_dim, H, W);
2. spatiotemporal attention (§3.3): ``S = STCB_2(A, T)`` at each location, two convolutions (64 channels, then
   1), a softmax over the H*W locations, ``a_att = sum_l alpha_l A_l`` (B, Ca) of the ORIGINAL appearance map;
3. top fusion (§3.4): ``z = STCB_3(avg(A), avg(T), a_att)`` (B, 4096, Table 3), dropout, linear -> logits;
   one cross-entropy loss, end to end (Table 1).

The ablation models of Table 6 are one option, ``model``:

- ``A``: the original two-stream network ([Two-Stream]; Table 2: "averaging the outputs of the Softmax layers"):
  each stream's own classifier on its average-pooled map (the flow stack at t, the centre path), the two
  softmax outputs averaged. ``logits`` is log of that average (a log-probability row, as the heads'
  convention in :mod:`pipeline.models.fusion`); the loss is the sum of the two streams' cross-entropies, which
  trains each stream on its own ("2 (Average)" losses, Table 1).
- ``B`` (+ ST Fusion): ``STCB_3(avg(A), avg(M_t))`` -> classifier; the flow stack at t only (Table 3's
  compact bilinear, d = 4096: 93.2 %, Table 6's B).
- ``C`` (+ Multi-T Fusion): ``STCB_3(avg(A), avg(T))``, T the level-1 fusion of the K paths.
- ``D`` (+ Attention, the final network): the three levels above.

Choices the paper leaves open (all options, see :data:`OPTIONS`; docs/networks.md lists them with reasons):
the level-1 and level-2 STCB widths (4096 each), signed square root and L2 normalisation after every STCB
(Gao et al., compact bilinear pooling, [STPN] ref. [7]; ``normalize``), the attention convolutions' kernels
(1 x 1) and the activation between them (ReLU), as in MCB attention (Fukui et al., EMNLP 2016), dropout 0.5
before the classifiers, and K = 1: the level-1 fusion is then the identity (an STCB of one input is a random
signed projection that adds nothing; Table 4's 1-path column is the plain flow network).

Maps are channel-first (B, C, H, W) like every torch convolution; STCB runs on the channel-last view
(:class:`SpatialSTCB`), a store that keeps maps channel-last (B, H, W, C) feeds :meth:`SpatialSTCB.channels_last`
or permutes them (``x.permute(0, 3, 1, 2)``, a view).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import Backbone, create_backbone, load_finetuned_classifier, load_finetuned_trunk
from .fusion import log_mean_probs
from .stcb import DEFAULT_STCB_DIM, CompactBilinear, signed_sqrt_l2

__all__ = [
    "MODELS",
    "OPTIONS",
    "PAPER_TRAINING",
    "SpatialSTCB",
    "TemporalFusion",
    "SpatiotemporalAttention",
    "STPN",
    "STPNEndToEnd",
    "build_stpn",
]

#: Table 6's models: A two-stream average, B + ST fusion, C + multi-path temporal fusion, D + attention.
MODELS = ("A", "B", "C", "D")
ACTIVATIONS = ("relu", "none")

#: Constructor options a user may set ({name: (default, help)}), read by the network registry.
OPTIONS: dict[str, tuple[object, str]] = {
    "model": ("D", "Table 6 model: A two-stream average, B +STCB fusion, C +multi-path temporal, D +attention "
                   "([STPN] §4.6)"),
    "num_paths": (3, "flow paths K at t-tau, t, t+tau ([STPN] §3.2, Table 4: 3 best)"),
    "stcb_dim": (DEFAULT_STCB_DIM, "width d of the top STCB ([STPN] Table 3: 4096)"),
    "temporal_dim": (DEFAULT_STCB_DIM, "width of the level-1 temporal STCB (not stated in [STPN])"),
    "attention_dim": (DEFAULT_STCB_DIM, "width of the level-2 attention STCB (not stated in [STPN])"),
    "attention_hidden": (64, "channels of the first attention conv ([STPN] §3.3: 64)"),
    "attention_kernel": (1, "kernel of the two attention convs, odd (not stated in [STPN]; 1 as MCB attention)"),
    "attention_activation": ("relu", "between the attention convs: relu | none (not stated in [STPN])"),
    "normalize": (True, "signed sqrt + L2 after each STCB (compact bilinear pooling, [STPN] ref. [7])"),
    "dropout": (0.5, "dropout before the classifier(s) (not stated in [STPN])"),
}

#: [STPN] §4.1 for ResNets (the stage's defaults): SGD, mini-batch 32, lr 1e-3 divided by 10 every 10,000
#: iterations, stop at 20,000 (VGG-16: lr 1e-2, stop at 30,000). Momentum and weight decay are not stated.
PAPER_TRAINING = {"optimizer": "sgd", "batch_size": 32, "lr": 1e-3, "lr_step_iterations": 10_000,
                  "lr_factor": 0.1, "iterations": 20_000}


def _norm(z: Tensor, normalize: bool) -> Tensor:
    return signed_sqrt_l2(z) if normalize else z


class SpatialSTCB(nn.Module):
    """STCB at every spatial location: maps (B, C_i, H, W) -> (B, output_dim, H, W).

    Location (h, w) of the output is ``norm(STCB(x_1[:, :, h, w], ..., x_m[:, :, h, w]))`` with one sketch
    (h_i, s_i) shared by all locations; ``norm`` is signed sqrt + L2 over the channels when ``normalize``.

    Args:
        input_dims: the channels C_i of the fused maps.
        output_dim: d.
        normalize: signed sqrt + L2 per location.
        seed: seed of the count-sketch draws.
    """

    def __init__(self, input_dims: list[int] | tuple[int, ...], output_dim: int, *, normalize: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        self.stcb = CompactBilinear(input_dims, output_dim, seed=seed)
        self.normalize = normalize
        self.output_dim = self.stcb.output_dim

    def channels_last(self, *maps: Tensor) -> Tensor:
        """Channel-last maps (B, H, W, C_i) -> (B, H, W, output_dim)."""
        return _norm(self.stcb(*maps), self.normalize)

    def forward(self, *maps: Tensor) -> Tensor:
        if len({tuple(m.shape[-2:]) for m in maps}) != 1 or any(m.dim() != 4 for m in maps):
            raise ValueError(f"spatial STCB needs maps (B, C, H, W) of one size, got {[tuple(m.shape) for m in maps]}")
        return self.channels_last(*(m.movedim(1, -1) for m in maps)).movedim(-1, 1)


class TemporalFusion(nn.Module):
    """Level 1 ([STPN] §3.2): STCB of K flow-path maps at each location, (B, K, C, H, W) -> (B, out, H, W).

    With ``num_paths == 1`` it is the identity (``out_channels == channels``), otherwise ``out_channels ==
    output_dim``.
    """

    def __init__(self, channels: int, num_paths: int, output_dim: int = DEFAULT_STCB_DIM, *, normalize: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        if num_paths < 1:
            raise ValueError(f"num_paths must be >= 1, got {num_paths}")
        self.num_paths = num_paths
        self.stcb = SpatialSTCB([channels] * num_paths, output_dim, normalize=normalize, seed=seed) \
            if num_paths > 1 else None
        self.out_channels = output_dim if num_paths > 1 else channels

    def forward(self, flow_maps: Tensor) -> Tensor:
        if flow_maps.dim() != 5 or flow_maps.shape[1] != self.num_paths:
            raise ValueError(f"flow maps must be (B, {self.num_paths}, C, H, W), got {tuple(flow_maps.shape)}")
        if self.stcb is None:
            return flow_maps[:, 0]
        return self.stcb(*flow_maps.unbind(1))


class SpatiotemporalAttention(nn.Module):
    """Level 2 ([STPN] §3.3): attention pooling of the appearance map guided by the temporal map.

    ``S = STCB(A, T)`` at each location (B, stcb_dim, H, W); ``conv(stcb_dim -> hidden)``, activation,
    ``conv(hidden -> 1)`` (kernel ``kernel_size``, zero "same" padding) give one score per location; the
    softmax over the H*W locations gives ``alpha`` (B, H, W), positive, summing to 1 per sample; the output is
    ``sum_l alpha_l A_l`` (B, Ca), a weighted average of the original appearance vectors.

    Args:
        appearance_channels, temporal_channels: Ca, Ct.
        stcb_dim: width of the attention STCB.
        hidden: channels of the first convolution ([STPN]: 64).
        kernel_size: odd kernel of both convolutions (1: per-location scores, as MCB attention).
        activation: ``relu`` or ``none`` between the convolutions.
        normalize, seed: see :class:`SpatialSTCB`.
    """

    def __init__(self, appearance_channels: int, temporal_channels: int, stcb_dim: int = DEFAULT_STCB_DIM, *,
                 hidden: int = 64, kernel_size: int = 1, activation: str = "relu", normalize: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"attention kernel_size must be odd and >= 1, got {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown attention activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if hidden < 1:
            raise ValueError(f"attention hidden channels must be >= 1, got {hidden}")
        self.stcb = SpatialSTCB([appearance_channels, temporal_channels], stcb_dim, normalize=normalize, seed=seed)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(stcb_dim, hidden, kernel_size, padding=pad)
        self.act = nn.ReLU() if activation == "relu" else nn.Identity()
        self.conv2 = nn.Conv2d(hidden, 1, kernel_size, padding=pad)

    def weights(self, appearance: Tensor, temporal: Tensor) -> Tensor:
        """(B, Ca, H, W), (B, Ct, H, W) -> attention weights (B, H, W), a softmax over the H*W locations."""
        scores = self.conv2(self.act(self.conv1(self.stcb(appearance, temporal))))  # (B, 1, H, W)
        b, _, h, w = scores.shape
        return F.softmax(scores.reshape(b, h * w), dim=1).reshape(b, h, w)

    def forward(self, appearance: Tensor, temporal: Tensor) -> tuple[Tensor, Tensor]:
        """-> (attended (B, Ca), weights (B, H, W))."""
        alpha = self.weights(appearance, temporal)
        return torch.einsum("bchw,bhw->bc", appearance, alpha), alpha


class STPN(nn.Module):
    """The pyramid on cached maps: ``forward({"rgb_map", "flow_maps"})`` -> ``{"logits", ...}``.

    Args (keyword-only; :data:`OPTIONS` describes the user options):
        num_classes: C.
        rgb_channels, flow_channels: Ca, Cm of the last conv maps (2048 for ResNet-50/101/152).
        model: ``A`` | ``B`` | ``C`` | ``D`` (Table 6; module docstring).
        num_paths: K, flow paths per sample (the batch's ``flow_maps`` must hold K; A and B read only the
            centre path ``(K - 1) // 2``, the stack at t).
        stcb_dim: top STCB width d (Table 3: 4096).
        temporal_dim, attention_dim: level-1 and level-2 STCB widths.
        attention_hidden, attention_kernel, attention_activation: the attention convolutions.
        normalize: signed sqrt + L2 after every STCB.
        dropout: before the classifier (model A: before each stream's classifier).
        seed: seed of the count sketches (level 1: seed, level 2: seed + 1, top: seed + 2).

    Output of :meth:`forward`: ``logits`` (B, C) (model A: log of the averaged stream probabilities),
    ``features`` (B, d) the top STCB's output (B-D), ``attention`` (B, H, W) (D), ``rgb_logits`` and
    ``flow_logits`` (A).
    """

    def __init__(self, *, num_classes: int, rgb_channels: int, flow_channels: int, model: str = "D",
                 num_paths: int = 3, stcb_dim: int = DEFAULT_STCB_DIM, temporal_dim: int = DEFAULT_STCB_DIM,
                 attention_dim: int = DEFAULT_STCB_DIM, attention_hidden: int = 64, attention_kernel: int = 1,
                 attention_activation: str = "relu", normalize: bool = True, dropout: float = 0.5,
                 seed: int = 0) -> None:
        super().__init__()
        if model not in MODELS:
            raise ValueError(f"unknown STPN model {model!r}; valid: {', '.join(MODELS)} ([STPN] Table 6)")
        for name, value in (("num_classes", num_classes), ("rgb_channels", rgb_channels),
                            ("flow_channels", flow_channels), ("num_paths", num_paths)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.model, self.num_classes, self.num_paths = model, num_classes, num_paths
        self.rgb_channels, self.flow_channels, self.normalize = rgb_channels, flow_channels, normalize
        self.dropout = nn.Dropout(dropout)
        if model == "A":
            self.fc_rgb = nn.Linear(rgb_channels, num_classes)
            self.fc_flow = nn.Linear(flow_channels, num_classes)
            return
        temporal_channels = flow_channels
        if model in ("C", "D"):
            self.temporal = TemporalFusion(flow_channels, num_paths, temporal_dim, normalize=normalize, seed=seed)
            temporal_channels = self.temporal.out_channels
        top_inputs = [rgb_channels, temporal_channels]
        if model == "D":
            self.attention = SpatiotemporalAttention(
                rgb_channels, temporal_channels, attention_dim, hidden=attention_hidden, kernel_size=attention_kernel,
                activation=attention_activation, normalize=normalize, seed=seed + 1)
            top_inputs.append(rgb_channels)
        self.top = CompactBilinear(top_inputs, stcb_dim, seed=seed + 2)
        self.fc = nn.Linear(stcb_dim, num_classes)

    @property
    def centre_path(self) -> int:
        """Index of the flow stack at t among the K paths."""
        return (self.num_paths - 1) // 2

    @property
    def paths_used(self) -> list[int]:
        """The paths the model reads: the centre one for A and B, all K for C and D."""
        return [self.centre_path] if self.model in ("A", "B") else list(range(self.num_paths))

    def check_maps(self, rgb_map: Tensor, flow_maps: Tensor) -> None:
        """Raise ValueError unless rgb_map is (B, Ca, H, W) and flow_maps (B, K, Cm, H, W) of the same B, H, W."""
        if rgb_map.dim() != 4 or rgb_map.shape[1] != self.rgb_channels:
            raise ValueError(f"rgb_map must be (B, {self.rgb_channels}, H, W), got {tuple(rgb_map.shape)}")
        if flow_maps.dim() != 5 or flow_maps.shape[1:3] != (self.num_paths, self.flow_channels):
            raise ValueError(f"flow_maps must be (B, {self.num_paths}, {self.flow_channels}, H, W), "
                             f"got {tuple(flow_maps.shape)}")
        if rgb_map.shape[0] != flow_maps.shape[0] or rgb_map.shape[-2:] != flow_maps.shape[-2:]:
            raise ValueError(f"rgb_map {tuple(rgb_map.shape)} and flow_maps {tuple(flow_maps.shape)} differ in "
                             "batch size or map size (H, W)")

    def forward_maps(self, rgb_map: Tensor, flow_maps: Tensor) -> dict[str, Tensor]:
        """rgb_map (B, Ca, H, W), flow_maps (B, K, Cm, H, W) -> the output dict (class docstring)."""
        self.check_maps(rgb_map, flow_maps)
        a_avg = rgb_map.mean(dim=(2, 3))
        if self.model == "A":
            m_avg = flow_maps[:, self.centre_path].mean(dim=(2, 3))
            rgb_logits = self.fc_rgb(self.dropout(a_avg))
            flow_logits = self.fc_flow(self.dropout(m_avg))
            logits = log_mean_probs([F.log_softmax(rgb_logits, dim=-1), F.log_softmax(flow_logits, dim=-1)])
            return {"logits": logits, "rgb_logits": rgb_logits, "flow_logits": flow_logits}
        out: dict[str, Tensor] = {}
        temporal = flow_maps[:, self.centre_path] if self.model == "B" else self.temporal(flow_maps)
        inputs = [a_avg, temporal.mean(dim=(2, 3))]
        if self.model == "D":
            attended, out["attention"] = self.attention(rgb_map, temporal)
            inputs.append(attended)
        out["features"] = _norm(self.top(*inputs), self.normalize)
        out["logits"] = self.fc(self.dropout(out["features"]))
        return out

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``batch["rgb_map"]`` (B, Ca, H, W), ``batch["flow_maps"]`` (B, K, Cm, H, W) float -> output dict."""
        return self.forward_maps(batch["rgb_map"], batch["flow_maps"])

    def loss(self, out: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        """One cross-entropy on the fused logits (B-D, Table 1); model A: the two streams' cross-entropies summed."""
        if self.model == "A":
            return F.cross_entropy(out["rgb_logits"], labels) + F.cross_entropy(out["flow_logits"], labels)
        return F.cross_entropy(out["logits"], labels)

    @staticmethod
    def class_scores(out: Mapping[str, Tensor]) -> Tensor:
        """(B, C) class probabilities of one view (A: the average of the streams' softmax outputs)."""
        return F.softmax(out["logits"].float(), dim=-1)

    def load_stream_classifiers(self, rgb_state: Mapping[str, Tensor], flow_state: Mapping[str, Tensor]) -> None:
        """Model A: the streams' classifiers from finetune state dicts (their ``fc.weight``, ``fc.bias``)."""
        if self.model != "A":
            raise ValueError(f"model {self.model} has no stream classifiers (only model A uses them)")
        load_finetuned_classifier(self.fc_rgb, rgb_state, "rgb")
        load_finetuned_classifier(self.fc_flow, flow_state, "flow")


class STPNEndToEnd(nn.Module):
    """The pyramid on live backbones: an RGB backbone and ONE shared motion backbone for the K flow stacks.

    ``forward({"rgb": (B, 3, H, W), "flow": (B, K, 2L, H, W)})`` (float, normalised as the backbones expect:
    :func:`~pipeline.models.backbones.normalize_rgb`, :func:`~pipeline.models.backbones.normalize_flow`) runs the
    backbones up to their last conv map (:meth:`~pipeline.models.backbones.Backbone.forward_map`) and the
    pyramid on the maps; models A and B pass only the centre stack through the motion backbone (two backbone
    passes per sample instead of K + 1). ``loss`` and ``class_scores`` are the pyramid's.

    Args:
        rgb, flow: backbones built with ``num_classes=0`` (their classifiers, for model A, are the pyramid's).
        pyramid: an :class:`STPN` with ``rgb_channels == rgb.num_features``, ``flow_channels ==
            flow.num_features``.
    """

    def __init__(self, rgb: Backbone, flow: Backbone, pyramid: STPN) -> None:
        super().__init__()
        if (rgb.num_features, flow.num_features) != (pyramid.rgb_channels, pyramid.flow_channels):
            raise ValueError(f"the pyramid takes {pyramid.rgb_channels}/{pyramid.flow_channels}-channel maps, the "
                             f"backbones give {rgb.num_features} ({rgb.arch}) / {flow.num_features} ({flow.arch})")
        self.rgb, self.flow, self.pyramid = rgb, flow, pyramid

    @classmethod
    def from_finetuned(cls, rgb_state: Mapping[str, Tensor], flow_state: Mapping[str, Tensor], *, rgb_arch: str,
                       flow_arch: str, num_classes: int, flow_in_channels: int = 20, **options) -> STPNEndToEnd:
        """The network initialised from two finetune runs ([STPN] §4.1: each stream fine-tuned first).

        Args:
            rgb_state, flow_state: the ``"model"`` entries of finetune's checkpoints (:class:`Backbone` state
                dicts, keys ``trunk.*`` and ``fc.*``); the model never reads files.
            rgb_arch, flow_arch: their backbone names (the checkpoints' ``"arch"``).
            num_classes: C.
            flow_in_channels: 2L of the motion backbone (20 for L = 10).
            options: :class:`STPN` options (:data:`OPTIONS`, ``seed``). Model A also takes the streams'
                classifiers from the state dicts; B-D start new fusion layers.
        """
        rgb = create_backbone(rgb_arch, num_classes=0, in_channels=3)
        flow = create_backbone(flow_arch, num_classes=0, in_channels=flow_in_channels)
        load_finetuned_trunk(rgb, rgb_state, "rgb")
        load_finetuned_trunk(flow, flow_state, "flow")
        pyramid = build_stpn(num_classes=num_classes, rgb_channels=rgb.num_features,
                             flow_channels=flow.num_features, **options)
        if pyramid.model == "A":
            pyramid.load_stream_classifiers(rgb_state, flow_state)
        return cls(rgb, flow, pyramid)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        rgb, flow = batch["rgb"], batch["flow"]
        p = self.pyramid
        if flow.dim() != 5 or flow.shape[1] != p.num_paths:
            raise ValueError(f"flow must be (B, {p.num_paths}, 2L, H, W), got {tuple(flow.shape)}")
        rgb_map = self.rgb.forward_map(rgb)
        used = p.paths_used
        maps = self.flow.forward_map(flow[:, used].flatten(0, 1))
        maps = maps.view(flow.shape[0], len(used), *maps.shape[1:])
        if len(used) < p.num_paths:  # A and B read only the centre path; the others are never looked at
            maps = maps.expand(-1, p.num_paths, -1, -1, -1)
        return p.forward_maps(rgb_map, maps)

    def loss(self, out: Mapping[str, Tensor], labels: Tensor) -> Tensor:
        return self.pyramid.loss(out, labels)

    @staticmethod
    def class_scores(out: Mapping[str, Tensor]) -> Tensor:
        return STPN.class_scores(out)


def build_stpn(*, num_classes: int, rgb_channels: int, flow_channels: int, **options) -> STPN:
    """The pyramid on maps; ``options`` are :data:`OPTIONS` (and ``seed``), unknown ones refused by name."""
    unknown = sorted(set(options) - set(OPTIONS) - {"seed"})
    if unknown:
        raise ValueError(f"unknown STPN option(s) {unknown}; valid: {', '.join(OPTIONS)}, seed")
    return STPN(num_classes=num_classes, rgb_channels=rgb_channels, flow_channels=flow_channels, **options)
