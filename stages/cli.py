"""The ``pipeline`` command: a Click group with one thin command per stage, plus ``status``, ``runs``, ``gc``.

Each stage command is generated from the stage's parameter dataclass (every field becomes an option with its
help text and default), builds the params object (defaults < ``--config`` TOML < options) and calls
:func:`pipeline.stage.run_stage`. Everything here is callable from Python through ``run_stage`` directly.
"""
from __future__ import annotations

import os

# On a machine whose cores are shared with other work, OpenMP threads that spin while waiting make every small
# PyTorch op much slower (docs/benchmarks.md); set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging  # noqa: E402
import sys
from pathlib import Path

import click

from pipeline.stage import config as cfg
from pipeline import dist
from pipeline.stage import StageError, StageFailures, run_stage, runcache, stage_keys_in_cache, status
from pipeline.stage.config import ConfigError
from stages.options import fail, param_options

log = logging.getLogger("pipeline")


def setup_logging(verbose: bool) -> None:
    """Log the ``pipeline`` logger to stderr (debug with ``verbose``)."""
    root = logging.getLogger("pipeline")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def common_options(fn):
    fn = click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
                      help="TOML config file with a table per stage (see README).")(fn)
    fn = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                      help=f"Cache root for all stage outputs [default: ${cfg.CACHE_ENV} or cache/ at the "
                           "repository root].")(fn)
    fn = click.option("--allow-failures", is_flag=True, default=False,
                      help="Finish with exit status 0 even if some videos failed (they are recorded).")(fn)
    fn = click.option("--force", is_flag=True, default=False,
                      help="Recompute even if the output is fresh.")(fn)
    fn = click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")(fn)
    return fn


def config_tables() -> set[str]:
    """The tables a config file may have: one per command, plus [pipeline]."""
    from stages import CATALOG

    return {"pipeline", *CATALOG}


def resolve_cache_dir(cache_dir: Path | None, config: dict) -> Path:
    if cache_dir is not None:
        return cache_dir
    from_config = cfg.pipeline_setting(config, "cache_dir")
    return Path(from_config) if from_config else cfg.default_cache_dir()


def make_stage_command(stage):
    def command(config_path, cache_dir, allow_failures, force, verbose, **overrides):
        setup_logging(verbose)
        try:
            conf = cfg.load_config(config_path, config_tables())
            params = cfg.build_params(stage.params_type, conf, stage.name, overrides, config_path=config_path)
            given = cfg.given_params(stage.params_type, conf, stage.name, overrides, config_path=config_path)
            root = resolve_cache_dir(cache_dir, conf)
            result = run_stage(stage, params, root, allow_failures=allow_failures, force=force, given=given)
            dist.shutdown()
        except StageFailures as e:
            fail(str(e), 1)
        except (StageError, ConfigError) as e:
            fail(str(e), 2)
        click.echo(result.message)

    # The help is the stage's one paragraph; its module docstring is for developers and is not printed.
    command.__doc__ = stage.help
    command = param_options(stage.params_type)(common_options(command))
    return click.command(stage.name, help=stage.help, short_help=stage.help)(command)


class LazyGroup(click.Group):
    """Commands from :data:`stages.CATALOG`, each imported only when it runs (or when its help is asked)."""

    def list_commands(self, ctx):
        from stages import CATALOG

        return sorted(set(super().list_commands(ctx)) | set(CATALOG))

    def get_command(self, ctx, name):
        from stages import CATALOG, load_command

        if name in CATALOG:
            return load_command(name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        from stages import CATALOG

        own = {name: click.Group.get_command(self, ctx, name) for name in click.Group.list_commands(self, ctx)}
        rows = [(name, CATALOG[name][2]) if name in CATALOG else (name, own[name].get_short_help_str(80))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="stfn-pipeline")
def main():
    """Two-stream STFN action recognition, as cached stages that run in order.

    \b
    Stages: decode -> extract-flow -> finetune (rgb, flow) -> extract-features -> train-head -> refine -> evaluate.
    Every stage caches its output under the cache folder; re-running an unchanged, finished stage does nothing,
    and `pipeline status` shows which outputs are fresh, stale (and why) or missing.
    """


@main.command("status")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
def status_command(cache_dir, config_path):
    """Which stage outputs are fresh, stale (and which upstream change made them so), incomplete or missing."""
    from stages import all_stages

    try:
        conf = cfg.load_config(config_path, config_tables())
    except ConfigError as e:
        fail(str(e), 2)
    root = resolve_cache_dir(cache_dir, conf)
    rows = status(root, all_stages())
    click.echo(f"cache: {root}")
    width = max([len(r.key) for r in rows] + [5])
    click.echo(f"{'stage':<{width}}  {'state':<10}  {'fingerprint':<12}  {'finished':<25}  {'done':>6}  "
               f"{'failed':>6}  {'kept':<16}  why")
    for r in rows:
        kept = f"{r.kept} ({runcache.human_size(r.kept_size)})" if r.kept else "-"
        click.echo(f"{r.key:<{width}}  {r.state:<10}  {r.fingerprint[:12]:<12}  {r.finished:<25}  "
                   f"{r.done:>6}  {r.failed:>6}  {kept:<16}  {r.reason}")


def cache_root_from(cache_dir, config_path) -> Path:
    """The cache root of a plain command: ``--cache-dir``, else the config's, else the default (exits on a bad
    config)."""
    try:
        conf = cfg.load_config(config_path)
    except ConfigError as e:
        fail(str(e), 2)
    return resolve_cache_dir(cache_dir, conf)


_STATE_NOTE = {"torn": "manifest.json torn: rebuilt from its journal when restored",
               "unknown": "unknown run: its run.json and manifest are gone (only `pipeline gc` removes it)"}


def _run_line(rec, current_params: dict | None, ignore: frozenset[str] = frozenset()) -> str:
    """One run of ``runs`` / ``gc``: the parameters that differ from the current run's (``ignore``: those that
    do not change the output, such as ``workers``); ``current_params`` None when the key has no current run."""
    if rec.current:
        diff = "current"
    elif not rec.params:
        diff = ""
    elif current_params is None:
        diff = "no current run to compare with"
    else:
        diff = ", ".join(runcache.param_diff({k: v for k, v in current_params.items() if k not in ignore},
                                             {k: v for k, v in rec.params.items() if k not in ignore}))
    state = rec.state or ("complete" if rec.complete else "partial")
    note = _STATE_NOTE.get(state) or diff or "same parameters"
    return (f"{'*' if rec.current else ' '} {rec.key}  {rec.fingerprint[:12]:<12}  {state:<8}  "
            f"{runcache.human_age(rec.age_seconds) + ' ago':>9}  {runcache.human_size(rec.size):>10}  {note}")


def _execution_only(recs) -> frozenset[str]:
    """The parameters that do not change the output (``fingerprint=False``: workers, device) of the runs ``recs``
    of one key, as they recorded them; for runs recorded before that, from the key's stage declaration."""
    recorded = [r.execution_only for r in recs if r.execution_only is not None]
    if recorded:
        return frozenset().union(*recorded)
    import importlib

    from pipeline.stage.declare import execution_only
    from stages import CATALOG

    module, attr, _ = CATALOG.get(recs[0].key.split("/")[0], (None, "", ""))
    if module is None or attr is not None:
        return frozenset()
    return execution_only(importlib.import_module(f"stages.{module}").STAGE.params_type)


@main.command("runs")
@click.argument("stage_or_key")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
def runs_command(stage_or_key, cache_dir, config_path):
    """Every run of a stage (or one key) in the cache, current one marked *, with age, size, completeness and
    the parameters that differ from the current run."""
    root = cache_root_from(cache_dir, config_path)
    keys = sorted({k for k in stage_keys_in_cache(root) + runcache.keys_with_kept_runs(root)
                   if k == stage_or_key or k.startswith(stage_or_key.rstrip("/") + "/")})
    if not keys:
        fail(f"no run of {stage_or_key!r} in {root}", 2)
    for key in keys:
        recs = runcache.all_runs(root, key)
        current = next((r.params for r in recs if r.current), None)
        ignore = _execution_only(recs)
        for rec in recs:
            click.echo(_run_line(rec, current, ignore))


@main.command("gc")
@click.option("--stage", default=None, help="Only the runs of this stage (or key).")
@click.option("--keep-last", type=click.IntRange(min=0), default=None,
              help="Per key, keep the N newest kept runs besides the current one.")
@click.option("--older-than", default=None, help="Only runs older than this (e.g. 7d, 12h, 30m).")
@click.option("--yes", is_flag=True, default=False, help="Delete (without it, only list what would go).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
def gc_command(stage, keep_last, older_than, yes, cache_dir, config_path):
    """Remove kept runs from the run cache (a dry run unless --yes); the current run of a key is never removed
    and a key being run is refused. --yes also empties the trash a killed deletion left (<cache>/.trash)."""
    root = cache_root_from(cache_dir, config_path)
    try:
        age = runcache.parse_duration(older_than) if older_than is not None else None
    except ValueError as e:
        fail(str(e), 2)
    trash = [(p, runcache.folder_size(p)) for p in runcache.trash_folders(root)]
    try:
        removed = runcache.gc(root, stage=stage, keep_last=keep_last, older_than=age, yes=yes)
    except StageError as e:
        fail(str(e), 2)
    if trash:
        click.echo(f"trash left by interrupted deletions: {len(trash)} folder(s), "
                   f"{runcache.human_size(sum(n for _, n in trash))} ({'removed' if yes else 'removed by --yes'})")
    currents, ignored = {}, {}
    for rec in removed:
        if rec.key not in currents:
            recs = runcache.all_runs(root, rec.key, with_size=False)
            currents[rec.key] = next((r.params for r in recs if r.current), None)
            ignored[rec.key] = _execution_only(recs + [rec])
        click.echo(_run_line(rec, currents[rec.key], ignored[rec.key]))
    total = runcache.human_size(sum(r.size for r in removed))
    click.echo(f"{'removed' if yes else 'would remove'} {len(removed)} run(s), {total}"
               + ("" if yes or not removed else "; pass --yes to delete them"))

