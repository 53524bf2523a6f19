"""``run-all``: every stage in order, in one process, from one config file.

decode -> extract-flow -> finetune (rgb, flow) -> extract-features -> train-head (each listed head) -> ablate ->
refine -> train-net (each listed network) -> evaluate, the stages after extract-flow once per split of ``--splits``
(then one evaluate over them),
then ``pipeline report``'s page (``<cache>/report/index.html``). Each stage goes through :func:`pipeline.stage.run_stage`, so fresh stages are skipped
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

from pipeline.io import artifacts
from pipeline.stage import config as cfg
from pipeline.stage import StageError, StageFailures, param, run_stage

DEFAULT_HEADS = ("stfn", "stcb", "rgb", "flow", "late", "tsn", "concat", "stmultiplier")


def _known_nets(names: tuple[str, ...]) -> str | None:
    from pipeline.models.networks import list_networks

    unknown = [n for n in names if n not in list_networks()]
    return f"names unknown networks {unknown}; known: {', '.join(list_networks())}" if unknown else None


@dataclass(frozen=True)
class RunAllParams:
    heads: tuple[str, ...] = param(DEFAULT_HEADS, "Heads trained by train-head (each with the [train-head] settings "
                                   "of the config, STFN at its paper defaults: arch a, avg fusion, bi-directional).")
    ablate: bool = param(True, "Run `pipeline ablate` with the config's [ablate] settings (on the first split).")
    refine: bool = param(True, "Run `pipeline refine` (end-to-end training of backbones + the first head).")
    splits: tuple[int, ...] = param((), "Splits to train and evaluate (e.g. 1,2,3, [STFN] Table 6); empty: "
                                    "[finetune]'s split.")
    nets: tuple[str, ...] = param((), "End-to-end networks trained by train-net with the [train-net] settings "
                                  "(e.g. stmult); empty: none. Their streams must be finetune's arch.",
                                  check=_known_nets)


def _steps(conf: dict, config_path: Path | None, run_params: RunAllParams):
    """(label, stage, params) for every stage run, in order; built before anything runs, so a bad config
    stops the workflow before any work. decode and extract-flow run once; every later stage once per split
    (ablate on the first split only, as [STFN] Tables 1-4 are split-1 figures), then one evaluate over the
    splits when there are several."""
    from stages.decode import STAGE as DECODE
    from stages.evaluate import STAGE as EVALUATE
    from stages.extract_features import STAGE as FEATURES
    from stages.extract_flow import STAGE as FLOW
    from stages.finetune import STAGE as FINETUNE
    from stages.refine import STAGE as REFINE
    from stages.train_head import STAGE as TRAIN_HEAD
    from stages.train_head import TrainHeadParams, head_name
    from stages.train_net import STAGE as TRAIN_NET

    def build(stage, table=None, **over):
        return cfg.build_params(stage.params_type if stage else TrainHeadParams, conf, table or stage.name, over,
                                config_path=config_path)

    # decode and extract-flow may be imports (import-rawframes): kept unless the config names other values.
    given = {s.name: cfg.given_params(s.params_type, conf, s.name, {}, config_path=config_path) for s in (DECODE, FLOW)}
    steps = [("decode", DECODE, build(DECODE)), ("extract-flow", FLOW, build(FLOW))]
    first = build(FINETUNE, stream="rgb")
    splits = run_params.splits or (first.split,)
    for i, k in enumerate(splits):
        tag = f" (split {k})" if len(splits) > 1 else ""
        steps += [(f"finetune rgb{tag}", FINETUNE, build(FINETUNE, stream="rgb", split=k)),
                  (f"finetune flow{tag}", FINETUNE, build(FINETUNE, stream="flow", split=k))]
        # The scope's backbone: extract-features' arch when the config names one, else finetune's.
        feats = build(FEATURES, split=k, **({} if "arch" in conf.get("extract-features", {}) else {"arch": first.arch}))
        scoped = {"split": k, "backbone": feats.arch}
        steps.append((f"extract-features{tag}", FEATURES, feats))
        head_params = [build(TRAIN_HEAD, head=h, **scoped) for h in run_params.heads]
        steps += [(f"train-head {h}{tag}", TRAIN_HEAD, p) for h, p in zip(run_params.heads, head_params)]
        if run_params.ablate and i == 0:
            steps.append((f"ablate{tag}", None, build(None, "train-head", **scoped)))
        if run_params.refine:
            over = {} if "head_name" in conf.get("refine", {}) else {"head_name": head_name(head_params[0])}
            steps.append((f"refine{tag}", REFINE, build(REFINE, **over, **scoped)))
        steps += [(f"train-net {n}{tag}", TRAIN_NET, build(TRAIN_NET, net=n, **scoped)) for n in run_params.nets]
        steps.append((f"evaluate{tag}", EVALUATE, build(EVALUATE, splits=(k,), backbone=feats.arch)))
    if len(splits) > 1:
        steps.append(("evaluate (all splits)", EVALUATE, build(EVALUATE, splits=tuple(splits), backbone=feats.arch)))
    return [(label, stage, params, given.get(stage.name) if stage else None) for label, stage, params in steps]


def run_all(config_path: Path | None, cache_root: Path | None = None, echo=click.echo,
            splits: tuple[int, ...] | None = None) -> Path:
    """Run every stage; returns the cache root. ``splits`` overrides ``[run-all] splits``. Raises
    StageError / StageFailures / ConfigError."""
    from stages.ablate import AblateParams, ablate_dir, run_ablation
    from stages.cli import config_tables, resolve_cache_dir
    from stages.report import ReportParams, write_report

    conf = cfg.load_config(config_path, config_tables())
    run_params = cfg.build_params(RunAllParams, conf, "run-all", {"splits": splits}, config_path=config_path)
    root = resolve_cache_dir(cache_root, conf)
    steps = _steps(conf, config_path, run_params)
    report_params = cfg.build_params(ReportParams, conf, "report", {}, config_path=config_path)
    t_all = time.perf_counter()
    timings = []
    last_eval = None
    for label, stage, params, given in steps:
        t0 = time.perf_counter()
        echo(f"== {label}")
        if stage is None:  # ablate: a grid of train-head runs on the split and backbone of ``params``
            ap = cfg.build_params(AblateParams, conf, "ablate", {}, config_path=config_path)
            run_ablation(params, root, ap.grid, ap.seeds, echo=echo)
            echo(f"ablate: tables in {ablate_dir(root, params)}")
        else:
            result = run_stage(stage, params, root, given=given)
            # evaluate's message is the results table, printed in full (with per-class rows) at the end.
            lines = result.message.splitlines()
            echo(result.message if stage.name != "evaluate" else lines[0] if result.skipped else lines[-1])
            if stage.name == "evaluate":
                last_eval = root / result.key
        timings.append((label, time.perf_counter() - t0))
    echo("")
    if last_eval is not None and (last_eval / artifacts.RESULTS_MD).exists():
        echo((last_eval / artifacts.RESULTS_MD).read_text())
    echo("Plots and tables:")
    for pattern in (f"{artifacts.EVALUATE}/*/{artifacts.RESULTS_MD}", f"{artifacts.EVALUATE}/*/confusion/*.png",
                    f"{artifacts.ABLATE}/*/*.md", f"{artifacts.ABLATE}/*/*.png",
                    *(f"{s}/*/*/{artifacts.CURVES}" for s in (artifacts.FINETUNE, artifacts.TRAIN_HEAD,
                                                               artifacts.REFINE, artifacts.TRAIN_NET))):
        for path in sorted(root.glob(pattern)):
            echo(f"  {path}")
    slow = ", ".join(f"{label} {sec:.0f} s" for label, sec in timings if sec >= 1.0)
    echo(f"run-all: {len(steps)} steps in {time.perf_counter() - t_all:.1f} s" + (f" ({slow})" if slow else ""))
    echo(f"Report (open it in a browser): {write_report(root, report_params)}")
    return root


@click.command("run-all")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config with a table per stage and an optional [run-all] table (heads, ablate, refine).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--splits", default=None, help="Splits to run, e.g. 1,2,3 (each split's models side by side, "
              "then the mean ± std over splits). [default: [finetune]'s split]")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def run_all_command(config_path, cache_dir, splits, verbose):
    """Every stage in order, in one process; fresh stages are skipped.

    \b
    Examples:
      pipeline run-all --config configs/demo.toml
      pipeline run-all --config configs/ucf101_resnet101.toml --splits 1,2,3
    """
    from stages.cli import setup_logging

    setup_logging(verbose)
    try:
        run_all(config_path, cache_dir, splits=splits)
    except StageFailures as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except (StageError, cfg.ConfigError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
