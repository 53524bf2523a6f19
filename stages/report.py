"""``report``: one self-contained HTML page of the cache's results (:mod:`pipeline.eval.report`).

A plain command, not a stage: it reads what the stages finished and writes ``<cache>/report/index.html`` (or
``-o DIR``) every time it runs; nothing depends on it. ``run-all`` ends with it. docs/report.md.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click

from pipeline.stage import StageError, param
from stages.options import param_options


@dataclass(frozen=True)
class ReportParams:
    flow_videos: int = param(2, "Videos of the flow store shown colour-coded (the first of each of the first "
                             "classes); 0 for none.", min=0)
    flow_pairs: int = param(4, "Flows shown per video, evenly spaced.", min=1)


def write_report(root: Path, params: ReportParams, output: Path | None = None) -> Path:
    """Build the page; returns its path. Raises :class:`pipeline.eval.report.ReportError`."""
    from pipeline.eval.report import build_report

    return build_report(root, output, flow_videos=params.flow_videos, flow_pairs=params.flow_pairs).path


@click.command("report")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of the page (index.html). [default: <cache>/report]")
@param_options(ReportParams)
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config: [pipeline] cache_dir and [report] (flow-videos, flow-pairs).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
def report_command(output, flow_videos, flow_pairs, config_path, cache_dir):
    """One self-contained HTML page of the cache: results, curves, ablation, flow.

    Results tables beside the papers' figures, per-class accuracy, confusion matrices, training curves, the
    ablation chart and colour-coded flow frames, in <cache>/report/index.html (docs/report.md).

    \b
    Examples:
        pipeline report --config configs/demo.toml
        pipeline report --cache-dir /data/cache -o /tmp/report
    """
    from pipeline.eval.report import ReportError
    from pipeline.stage import config as cfg
    from stages.cli import config_tables, resolve_cache_dir

    try:
        conf = cfg.load_config(config_path, config_tables())
        params = cfg.build_params(ReportParams, conf, "report", {"flow_videos": flow_videos, "flow_pairs": flow_pairs},
                                  config_path=config_path)
        path = write_report(resolve_cache_dir(cache_dir, conf), params, output)
    except (ReportError, StageError, cfg.ConfigError) as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    click.echo(f"report: {path}")
