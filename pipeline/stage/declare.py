"""What a stage declares: its parameters, its plan, its upstream outputs, and the fingerprint inputs.

A stage (see ``stages/``) declares its name, a version string, a parameter dataclass (fields made with
:func:`param`), the upstream stage outputs it reads and a ``run`` function. This module also loads the complete
upstream manifests a run reads (:func:`load_upstream`; the manifest itself: :mod:`pipeline.stage.manifest`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.io.atomic import jsonable
from pipeline.stage.errors import StageError
from pipeline.stage.keys import key_parts, scope_keys
from pipeline.stage.manifest import Manifest, read_manifest


# ----------------------------------------------------------------------------------------------------------
# Parameters and digests
# ----------------------------------------------------------------------------------------------------------

def param(default: Any, help: str, *, fingerprint: bool = True, choices: Iterable[str] | None = None,
          cli: bool = True, omit_default: bool = False, **kw) -> Any:
    """A stage parameter: a dataclass field with help text (shown by ``--help``), optional choices, and
    whether it changes the output (``fingerprint=False`` for execution-only knobs like ``workers``).
    Its checks are declared here too and run by :func:`pipeline.stage.validate.validate_params` (from the command
    line and from :func:`pipeline.stage.run_stage` alike): ``min=``, ``max=`` (``min_exclusive``,
    ``max_exclusive``), ``also=`` (values accepted outside the range, e.g. ``(0,)`` for "automatic") and
    ``check=`` (``value -> None or the problem``).
    ``omit_default``: left out of the fingerprint while it has its default value, so that adding a parameter
    to a stage keeps the fingerprints of the runs made before it existed. ``recorded_as="old_name"`` (with
    ``aliases=("--old-name",)``): a renamed parameter keeps its old name in manifests and fingerprints, so the
    runs made before the rename stay fresh; the old option and config key still work."""
    meta = {"help": help, "fingerprint": fingerprint, "choices": tuple(choices) if choices else None, "cli": cli,
            "omit_default": omit_default}
    meta.update(kw)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def params_dict(params: Any, *, only_fingerprinted: bool = False) -> dict[str, Any]:
    """The parameters as JSON values (only those that change the output with ``only_fingerprinted``)."""
    out = {}
    for f in dataclasses.fields(params):
        if only_fingerprinted and not f.metadata.get("fingerprint", True):
            continue
        value = getattr(params, f.name)
        if only_fingerprinted and f.metadata.get("omit_default") and value == (
                f.default if f.default is not dataclasses.MISSING else f.default_factory()):
            continue
        out[f.metadata.get("recorded_as", f.name)] = jsonable(value)
    return out


def execution_only(params_type: type) -> frozenset[str]:
    """The recorded names of the parameters that do not change the output (``fingerprint=False``: workers,
    device, batch sizes): never a difference between two runs' outputs."""
    return frozenset(f.metadata.get("recorded_as", f.name) for f in dataclasses.fields(params_type)
                     if not f.metadata.get("fingerprint", True))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks (weights files, external score files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    blob = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Stage declaration
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What a stage's ``plan`` returns: an input digest (part of the fingerprint) and anything ``run`` needs."""

    inputs_digest: str = ""
    data: Any = None
    describe: str = ""
    #: The bytes the run writes (:class:`pipeline.stage.space.Space`), checked against the free space before
    #: work; None: only the floor every run needs.
    space: Any = None


@dataclass(frozen=True)
class Stage:
    name: str
    version: str
    params_type: type
    run: Callable[..., dict]
    plan: Callable[[Any, "Upstream"], Plan] = lambda params, upstream: Plan()
    upstream: Callable[..., tuple[str, ...]] = lambda params: ()
    key: Callable[[Any], str] | None = None
    help: str = ""
    #: ``(params, upstream) -> dict``: the parameters the fingerprint digests, when they depend on more than the
    #: fields' ``fingerprint`` flags (finetune: the flow settings for the flow stream only). Default:
    #: :func:`params_dict` ``(params, only_fingerprinted=True)``.
    fingerprint_params: Callable[[Any, "Upstream"], dict] | None = None
    #: ``(recorded params) -> str``: what a run with these parameters imported instead of computing (decode
    #: ``--dataset rawframes``, extract-flow ``--backend import``: "the mmaction2 tree /data/x"), "" when it
    #: computed its output. A current import stays current unless the parameters the user names differ
    #: (:func:`pipeline.stage.runner.run_stage`).
    imported: Callable[[dict], str] | None = None

    def import_source(self, recorded: dict) -> str:
        """What the run with the ``recorded`` parameters imported ("" when it computed its output)."""
        return self.imported(recorded) if self.imported is not None else ""

    def output_key(self, params: Any) -> str:
        return self.key(params) if self.key else self.name

    def fingerprinted(self, params: Any, upstream: "Upstream") -> dict:
        """The parameters this run's fingerprint digests."""
        if self.fingerprint_params is not None:
            return self.fingerprint_params(params, upstream)
        return params_dict(params, only_fingerprinted=True)

    def upstream_keys(self, params: Any, cache_root: Path) -> tuple[str, ...]:
        """The upstream outputs this run reads. ``upstream`` takes ``(params)``, or ``(params, cache_root)``
        for a stage whose inputs are discovered in the cache (``evaluate`` reads every finished head)."""
        n = len(inspect.signature(self.upstream).parameters)
        return tuple(self.upstream(params, cache_root) if n >= 2 else self.upstream(params))


# ----------------------------------------------------------------------------------------------------------
# Upstream outputs
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Upstream:
    """The complete manifests of the stage outputs a stage reads, by key, plus their folders."""

    cache_root: Path
    manifests: dict[str, Manifest]

    def dir(self, key: str) -> Path:
        return self.cache_root / key

    def fingerprints(self) -> dict[str, str]:
        return {k: m.fingerprint for k, m in self.manifests.items()}


def load_upstream(cache_root: Path, keys: Iterable[str], for_stage: str) -> Upstream:
    """The complete manifests of ``keys``; StageError naming the command to run when one is missing."""
    manifests = {}
    for key in keys:
        m = read_manifest(cache_root / key)
        if m is None:
            raise StageError(f"stage {for_stage!r} reads the output of {key!r}, which is missing in "
                             f"{cache_root / key}: run `pipeline {key.split('/')[0]}` first"
                             + _other_scopes_hint(cache_root, key))
        if not m.complete:
            found = len(m.damaged) + len(m.get("verify_findings") or [])
            why = (f"{len(m.damaged)} videos missing/damaged (found by `pipeline verify`)" if m.damaged
                   else f"{(m.get('verify_findings') or [''])[0]} (found by `pipeline verify`)" if found
                   else f"{m.failed} failures")
            raise StageError(f"stage {for_stage!r} reads the output of {key!r}, which is incomplete "
                             f"({why}): re-run `pipeline {key.split('/')[0]}` "
                             "or allow failures there")
        manifests[key] = m
    return Upstream(cache_root, manifests)


def _other_scopes_hint(cache_root: Path, key: str) -> str:
    """For a missing per-scope key: the scopes (split, backbone) that stage does have in the cache."""
    parts = key_parts(key)
    if parts.split is None:
        return ""
    others = scope_keys(cache_root, parts.stage)
    if not others:
        return f" (with --split {parts.split} and backbone {parts.backbone})"
    return (f" (with --split {parts.split} and backbone {parts.backbone}; {parts.stage} has outputs for "
            f"{', '.join(others)})")
