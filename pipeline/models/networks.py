"""Registry of end-to-end networks (``pipeline train-net --net NAME``), as :mod:`pipeline.models.heads` is of heads.

Each network declares, once, in a :class:`NetworkSpec`:

* its builder (the model module's, e.g. :func:`pipeline.models.stmult_net.build_stmult_net`), called with the
  class count, the finetune state dicts and archs of the streams it starts from, and its model options;
* its options with their defaults and help, *read from the model module's* ``OPTIONS`` (declared there, never
  copied here), plus the options of its sampling rules (clip length, strides, test views), and the checks of
  each option (``param``'s keywords: ``min``, ``max``, ``choices``, ...);
* what it reads: the finetune streams it is initialised from (``streams``), the stored inputs (``inputs``:
  ``frames`` of decode, ``flow`` of extract-flow) and the reader turning one sample into tensors
  (``data``, a key of :data:`pipeline.training.networks.READERS`);
* how its samples are drawn: ``train_sample(num_frames, rng, options)`` and ``eval_samples(num_frames,
  options, validation)``, thin adapters over the rules of :mod:`pipeline.data.sampling`, and its spatial test
  views (``eval_space(options)``, a key of :data:`pipeline.data.transforms.EVAL_SPACES`);
* which options apply in which configuration (``applies``) and the checks across options (``validate``).

:func:`network_options` turns the options a user gave into the effective ones and refuses an option the
network does not take (:class:`NetworkOptionError`, naming it and the network); :func:`network_output_name`
names an output by its effective options; :func:`create_network` builds the network.

==========  ========================================================================================
name        network
==========  ========================================================================================
stmult      Spatiotemporal Multiplier network ([ST-Mult]): motion-gated appearance ResNet + motion ResNet
==========  ========================================================================================

Adding a network (e.g. [STPN]'s ``STPNEndToEnd`` or [FstCN]): a :class:`NetworkSpec` entry here, its sampling
rules in :mod:`pipeline.data.sampling`, and a reader in :data:`pipeline.training.networks.READERS` when no
existing one gives its batch dict (docs/networks.md, "Adding a network to train-net").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor, nn

from pipeline.data import sampling
from pipeline.models import stmult_net

__all__ = ["NETWORKS", "DEFAULT_NETWORK", "NetworkSpec", "NetworkOptionError", "Source", "create_network",
           "list_networks", "load_network_checkpoint", "network_options", "network_label", "network_output_name",
           "option_fields", "model_options", "result_options"]


@dataclass(frozen=True)
class Source:
    """A stream a network starts from: the finetune checkpoint's arch, input channels and ``"model"`` state dict
    (None: random initialisation, e.g. to check a configuration without loading weights)."""

    arch: str
    in_channels: int
    state: Mapping[str, Tensor] | None = None


@dataclass(frozen=True)
class NetworkSpec:
    """One end-to-end network (see the module docstring).

    ``build(num_classes=, sources={stream: Source}, **model options) -> nn.Module`` with ``forward(batch)``,
    ``loss(out, labels)`` and ``class_scores(out)`` (docs/networks.md's contract). ``model_options`` is the model
    module's ``OPTIONS`` itself, ``sampling_options`` those of the sampling adapters, both ``{name: (default,
    help)}``. ``execution``: options that change how the network runs, not its results (gradient
    checkpointing): they are left out of the output name and the fingerprint. ``tags``: the short name of an
    option in output names (default: the option's name).
    """

    build: Callable[..., nn.Module]
    model_options: Mapping[str, tuple[Any, str]]
    streams: tuple[str, ...]
    inputs: tuple[str, ...]
    data: str
    train_sample: Callable[[int, np.random.Generator, Mapping[str, Any]], Any]
    eval_samples: Callable[[int, Mapping[str, Any], bool], Sequence[Any]]
    eval_space: Callable[[Mapping[str, Any]], str]
    sampling_options: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    checks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    execution: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    min_frames: int = 1
    applies: Callable[[str, Mapping[str, Any]], str | None] = field(default=lambda option, options: None)
    validate: Callable[[Mapping[str, Any]], str | None] = field(default=lambda options: None)
    help: str = ""

    @property
    def declared(self) -> dict[str, tuple[Any, str]]:
        """Every option, model and sampling: name -> (default, help)."""
        clash = set(self.model_options) & set(self.sampling_options)
        if clash:
            raise ValueError(f"options {sorted(clash)} are declared both by the model and by its sampling")
        return {**self.model_options, **self.sampling_options}

    @property
    def options(self) -> dict[str, Any]:
        """name -> default of every option."""
        return {k: v[0] for k, v in self.declared.items()}


class NetworkOptionError(ValueError):
    """An option that the network does not take (or not in this configuration); ``option`` and ``net`` name
    them."""

    def __init__(self, option: str, net: str, why: str = ""):
        self.option, self.net = option, net
        super().__init__(f"option {option} does not apply to network {net}" + (f" {why}" if why else ""))


# ----------------------------------------------------------------------------------------------------------
# [ST-Mult]
# ----------------------------------------------------------------------------------------------------------

def _build_stmult(*, num_classes: int, sources: Mapping[str, Source], **options) -> nn.Module:
    rgb, flow = sources["rgb"], sources["flow"]
    if rgb.in_channels != 3:
        raise ValueError(f"the appearance stream takes 3 input channels, its finetune checkpoint {rgb.in_channels}")
    return stmult_net.build_stmult_net(num_classes=num_classes, rgb_arch=rgb.arch, flow_arch=flow.arch,
                                       flow_in_channels=flow.in_channels, rgb_state=rgb.state,
                                       flow_state=flow.state, **options)


def _stmult_train(num_frames: int, rng: np.random.Generator, o: Mapping[str, Any]) -> list[int]:
    """§4.1: ``clip_frames`` frames at a random stride in [min_stride, max_stride]; each frame's flow stack."""
    return sampling.stmult_train_indices(num_frames, rng, num_samples=o["clip_frames"], min_stride=o["min_stride"],
                                         max_stride=o["max_stride"])


def _stmult_eval(num_frames: int, o: Mapping[str, Any], validation: bool) -> list[list[int]]:
    """§4.2: ``test_frames`` uniformly spaced frames in chunks of ``test_chunk``, one forward pass each;
    validation after each epoch: ``val_frames`` frames in one chunk (and no flips, see the stage)."""
    if validation:
        return sampling.stmult_test_chunks(num_frames, num_samples=o["val_frames"], chunk_size=o["val_frames"])
    return sampling.stmult_test_chunks(num_frames, num_samples=o["test_frames"], chunk_size=o["test_chunk"])


def _stmult_validate(o: Mapping[str, Any]) -> str | None:
    if o["min_stride"] > o["max_stride"]:
        return f"min_stride {o['min_stride']} exceeds max_stride {o['max_stride']}"
    if o["test_frames"] % o["test_chunk"]:
        return f"test_chunk {o['test_chunk']} does not divide test_frames {o['test_frames']}"
    return None


_STMULT = NetworkSpec(
    build=_build_stmult,
    model_options=stmult_net.OPTIONS,
    sampling_options={
        "clip_frames": (5, "frames (and flow stacks) per training clip ([ST-Mult] §4.1: 5)"),
        "min_stride": (5, "smallest temporal stride of a training clip ([ST-Mult] §4.1: 5)"),
        "max_stride": (35, "largest temporal stride, capped so the clip fits ([ST-Mult] §4.1: 35)"),
        "test_frames": (25, "uniformly spaced test frames with their flips ([ST-Mult] §4.2: 25)"),
        "test_chunk": (25, "test frames per forward pass (25: the whole video at once, §4.2)"),
        "val_frames": (5, "frames per validation video after each epoch (one chunk, no flips)"),
        "test_view": ("full", "spatial test view, with its flip: full (the whole frame at short side 256 for "
                              "224 crops, fully convolutional, [ST-Mult] §4.2), center (a centre crop) or ten_crop"),
    },
    checks={
        "gate_appearance": {"choices": stmult_net.GATE_APPEARANCE},
        "temporal_placement": {"choices": tuple(stmult_net.PLACEMENTS)},
        "temporal_init": {"choices": tuple(stmult_net.TEMPORAL_INITS)},
        "temporal_pool": {"choices": stmult_net.TEMPORAL_POOLS},
        "dropout": {"min": 0.0, "max": 1.0, "max_exclusive": True},
        "fusion": {"choices": stmult_net.FUSIONS},
        "flow_weight": {"min": 0.0},
        "test_view": {"choices": ("full", "center", "ten_crop")},
        **{k: {"min": 1} for k in ("clip_frames", "min_stride", "max_stride", "test_frames", "test_chunk",
                                   "val_frames")},
    },
    streams=("rgb", "flow"),
    inputs=("frames", "flow"),
    data="clip",
    train_sample=_stmult_train,
    eval_samples=_stmult_eval,
    eval_space=lambda o: o["test_view"],
    execution=("checkpointing",),
    tags={"gate_appearance": "gate", "temporal_placement": "place", "temporal_init": "init",
          "temporal_pool": "tpool", "dropout": "p", "fusion": "fuse", "flow_weight": "w", "clip_frames": "t",
          "min_stride": "smin", "max_stride": "smax", "test_frames": "tf", "test_chunk": "tc", "val_frames": "vf",
          "test_view": "view"},
    min_frames=2,  # a flow stack needs one flow field, i.e. two frames
    validate=_stmult_validate,
    help="Spatiotemporal Multiplier network [ST-Mult]: motion gating (eq. 5) and temporal filters (eq. 8-10) "
         "inside two ResNets, end to end",
)

#: name -> the network's declaration.
NETWORKS: dict[str, NetworkSpec] = {"stmult": _STMULT}
DEFAULT_NETWORK = "stmult"


# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------

def list_networks() -> list[str]:
    """Names accepted by :func:`create_network`, sorted."""
    return sorted(NETWORKS)


def _spec(name: str) -> NetworkSpec:
    try:
        return NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; valid networks: {', '.join(list_networks())}") from None


def network_options(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective options of network ``name``: its defaults updated with ``given`` (None values = not
    given), without those that do not apply in this configuration.

    Raises :class:`NetworkOptionError` for a given option the network does not take or that does not apply,
    ValueError for values its checks across options refuse."""
    spec = _spec(name)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for k in given:
        if k not in spec.options:
            raise NetworkOptionError(k, name, f"(it takes: {', '.join(spec.options)})")
    merged = {**spec.options, **given}
    for k in given:
        why = spec.applies(k, merged)
        if why:
            raise NetworkOptionError(k, name, why)
    problem = spec.validate(merged)
    if problem:
        raise ValueError(f"network {name}: {problem}")
    return {k: v for k, v in merged.items() if not spec.applies(k, merged)}


def model_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of effective ``options`` that the builder takes (the model module's ``OPTIONS``)."""
    spec = _spec(name)
    return {k: v for k, v in options.items() if k in spec.model_options}


def result_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The effective options that change a trained network's results (all but the ``execution`` ones): what its
    fingerprint digests and its checkpoint records."""
    spec = _spec(name)
    return {k: v for k, v in options.items() if k not in spec.execution}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def network_label(name: str, options: Mapping[str, Any]) -> str:
    """``name`` and every effective option that differs from the network's default, in declaration order:
    ``stmult``, ``stmult-init_avg-p0.5`` (a number follows its tag, anything else after ``_``)."""
    spec = _spec(name)
    parts = [name]
    for k, default in spec.options.items():
        if k in spec.execution or k not in options or options[k] == default:
            continue
        tag, v = spec.tags.get(k, k), options[k]
        parts.append(f"{tag}{_fmt(v)}" if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else f"{tag}_{_fmt(v)}")
    return "-".join(parts)


def network_output_name(name: str = DEFAULT_NETWORK, given: Mapping[str, Any] | None = None, *,
                        seed: int = 0) -> str:
    """The name of a ``train-net/<scope>/<name>`` output: :func:`network_label` of the effective options, then
    the seed (``stmult-s0``). The split and the streams' backbones are in the scope."""
    return f"{network_label(name, network_options(name, given))}-s{seed}"


def create_network(name: str, *, num_classes: int, sources: Mapping[str, Source], **options) -> nn.Module:
    """Build network ``name`` from its ``sources`` (one :class:`Source` per stream of ``spec.streams``) with
    ``options`` (given ones; the defaults fill the rest). Unknown names and options are refused, naming them
    (ValueError, :class:`NetworkOptionError`)."""
    spec = _spec(name)
    missing = [s for s in spec.streams if s not in sources]
    if missing:
        raise ValueError(f"network {name} starts from the finetune streams {', '.join(spec.streams)}; missing "
                         f"{', '.join(missing)}")
    effective = network_options(name, options)
    return spec.build(num_classes=num_classes, sources=sources, **model_options(name, effective))


# ----------------------------------------------------------------------------------------------------------
# The command line's view: one field per option name over every network
# ----------------------------------------------------------------------------------------------------------

def option_fields() -> dict[str, dict[str, Any]]:
    """Every option name some network takes: ``{"type": the default's type, "help": ..., "checks": param
    keywords}``, for the command that exposes them (``train-net``'s ``--<option>``). The help lists each
    network's default. Two networks sharing an option name must give it one type and the same checks (a
    ValueError naming them otherwise): one command-line option, one meaning."""
    out: dict[str, dict[str, Any]] = {}
    for net, spec in sorted(NETWORKS.items()):
        for k, (default, text) in spec.declared.items():
            tp = type(default) if default is not None else str
            checks = dict(spec.checks.get(k, {}))
            if k not in out:
                out[k] = {"type": tp, "help": text, "checks": checks, "defaults": {net: default}}
                continue
            seen = out[k]
            if seen["type"] is not tp or seen["checks"] != checks:
                owner = next(iter(seen["defaults"]))
                raise ValueError(f"option {k} is declared by networks {owner} and {net} with different types or "
                                 f"checks; give it one meaning (or another name)")
            seen["defaults"][net] = default
    for rec in out.values():
        shown = "; ".join(f"{net} {_fmt(d)}" for net, d in rec["defaults"].items())
        rec["help"] = f"{rec['help']} (network default: {shown})"
    return out


def load_network_checkpoint(path, device="cpu") -> tuple[nn.Module, dict]:
    """(network, checkpoint dict) from a ``best.pt`` written by ``train-net``: the network is rebuilt from the
    name, options, sources and classes recorded in the checkpoint, its weights loaded, on ``device``."""
    from pipeline.io.atomic import load_checkpoint

    ckpt = load_checkpoint(path, require=("model", "net", "net_options", "sources", "num_classes"),
                           map_location=device)
    sources = {s: Source(v["arch"], int(v["in_channels"])) for s, v in ckpt["sources"].items()}
    net = create_network(ckpt["net"], num_classes=int(ckpt["num_classes"]), sources=sources, **ckpt["net_options"])
    net.load_state_dict(ckpt["model"])
    return net.to(device), ckpt
