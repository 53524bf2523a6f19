"""``run-all``: every stage in order, in one process, from one config file.

decode -> extract-flow -> finetune (rgb, flow) -> extract-features -> train-head (each listed head) -> ablate ->
refine -> evaluate. Each stage goes through :func:`pipeline.stage.run_stage`, so fresh stages are skipped
and a changed parameter recomputes only what depends on it. Running in one process
(rather than one ``pipeline`` process per stage) means PyTorch is imported once: a re-run of a finished
pipeline takes seconds. ``run_all.sh`` calls this command.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from pipeline.stage import config as cfg
from pipeline.stage import StageError, StageFailures, param, run_stage

DEFAULT_HEADS = ("stfn", "stcb", "rgb", "flow", "late", "tsn", "concat", "stmultiplier")


@dataclass(frozen=True)
class RunAllParams:
    heads: tuple[str, ...] = param(DEFAULT_HEADS, "Heads trained by train-head (each with the [train-head] settings "
                                   "of the config, STFN at its paper defaults: arch a, avg fusion, bi-directional).")
    ablate: bool = param(True, "Run `pipeline ablate` with the config's [ablate] settings.")
    refine: bool = param(True, "Run `pipeline refine` (end-to-end training of backbones + the first head).")


def _steps(conf: dict, config_path: Path | None, run_params: RunAllParams):
    """(label, stage, params) for every stage run, in order; built before anything runs, so a bad config
    stops the workflow before any work."""
    from stages.decode import STAGE as DECODE
    from stages.evaluate import STAGE as EVALUATE
    from stages.extract_features import STAGE as FEATURES
    from stages.extract_flow import STAGE as FLOW
    from stages.finetune import STAGE as FINETUNE
    from stages.train_head import STAGE as TRAIN_HEAD

    def build(stage, **over):
        return cfg.build_params(stage.params_type, conf, stage.name, over, config_path=config_path)

    steps = [("decode", DECODE, build(DECODE)), ("extract-flow", FLOW, build(FLOW)),
             ("finetune rgb", FINETUNE, build(FINETUNE, stream="rgb")),
             ("finetune flow", FINETUNE, build(FINETUNE, stream="flow")),
             ("extract-features", FEATURES, build(FEATURES))]
    head_params = [build(TRAIN_HEAD, head=h) for h in run_params.heads]
    steps += [(f"train-head {h}", TRAIN_HEAD, p) for h, p in zip(run_params.heads, head_params)]
    if run_params.ablate:
        steps.append(("ablate", None, None))
    if run_params.refine:
        from stages.refine import STAGE as REFINE
        from stages.train_head import head_name

        over = {} if "head_name" in conf.get("refine", {}) else {"head_name": head_name(head_params[0])}
        steps.append(("refine", REFINE, build(REFINE, **over)))
    steps.append(("evaluate", EVALUATE, build(EVALUATE)))
    return steps


def run_all(config_path: Path | None, cache_root: Path | None = None, echo=click.echo) -> Path:
    """Run every stage; returns the cache root. Raises StageError / StageFailures / ConfigError."""
    from stages.ablate import AblateParams, run_ablation
    from stages.cli import config_tables, resolve_cache_dir
    from stages.train_head import TrainHeadParams

    conf = cfg.load_config(config_path, config_tables())
    run_params = cfg.build_params(RunAllParams, conf, "run-all", {}, config_path=config_path)
    root = resolve_cache_dir(cache_root, conf)
    steps = _steps(conf, config_path, run_params)
    t_all = time.perf_counter()
    timings = []
    for label, stage, params in steps:
        t0 = time.perf_counter()
        echo(f"== {label}")
        if stage is None:  # ablate: a grid of train-head runs
            ap = cfg.build_params(AblateParams, conf, "ablate", {}, config_path=config_path)
            base = cfg.build_params(TrainHeadParams, conf, "train-head", {}, config_path=config_path)
            run_ablation(base, root, ap.grid, ap.seeds, echo=echo)
        else:
            result = run_stage(stage, params, root)
            # evaluate's message is the results table, printed in full (with per-class rows) at the end.
            lines = result.message.splitlines()
            echo(result.message if stage.name != "evaluate" else lines[0] if result.skipped else lines[-1])
        timings.append((label, time.perf_counter() - t0))
    echo("")
    results = root / "evaluate" / "results.md"
    if results.exists():
        echo(results.read_text())
    echo("Plots and tables:")
    for pattern in ("evaluate/results.md", "evaluate/confusion/*.png", "ablate/*.md", "ablate/*.png",
                    "finetune/*/curves.png", "train-head/*/curves.png", "refine/*/curves.png"):
        for path in sorted(root.glob(pattern)):
            echo(f"  {path}")
    slow = ", ".join(f"{label} {sec:.0f} s" for label, sec in timings if sec >= 1.0)
    echo(f"run-all: {len(steps)} steps in {time.perf_counter() - t_all:.1f} s" + (f" ({slow})" if slow else ""))
    return root


@click.command("run-all")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config with a table per stage and an optional [run-all] table (heads, ablate, refine).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def run_all_command(config_path, cache_dir, verbose):
    """Every stage in order, in one process; fresh stages are skipped.

    \b
    Examples:
      pipeline run-all --config configs/demo.toml
      pipeline run-all --config configs/ucf101.toml --cache-dir /data/stfn-cache
    """
    from stages.cli import setup_logging

    setup_logging(verbose)
    try:
        run_all(config_path, cache_dir)
    except StageFailures as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except (StageError, cfg.ConfigError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
