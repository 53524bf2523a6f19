"""``verify``: check every stored video's chunks (frames, flow, features) and list the damaged ones.

A plain command over :mod:`pipeline.stage.verify`: the damaged videos are journaled for redo, so re-running
their stage recomputes exactly them.
"""
from __future__ import annotations

from pathlib import Path

import click


@click.command("verify")
@click.option("--stage", default=None, help="Only this stage's outputs: decode, extract-flow, extract-features "
              "(or one key, extract-features/split1-resnet101) [default: all three].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def verify_command(stage, cache_dir, config_path, verbose):
    """Read every stored video of the finished decode, extract-flow and extract-features outputs, verifying
    each chunk's checksum; list the damaged videos (exit status 1 when there are any) and mark them so that
    re-running their stage recomputes only them.

    \b
    Example:
      pipeline verify --stage extract-flow && pipeline extract-flow
    """
    from tqdm import tqdm

    from pipeline.stage.verify import mark_for_redo, verify_key, verify_keys
    from stages.cli import cache_root_from, setup_logging
    from stages.options import fail

    setup_logging(verbose)
    root = cache_root_from(cache_dir, config_path)
    keys = verify_keys(root, stage)
    if not keys:
        fail(f"verify: no finished {stage or 'decode / extract-flow / extract-features'} output in {root}", 2)
    damaged = 0
    for key in keys:
        with tqdm(desc=f"verify {key}", unit="video", dynamic_ncols=True, leave=False, disable=None) as bar:
            report = verify_key(root, key, progress=bar.update)
        mark_for_redo(root, report)
        line = f"{key}: {report.checked} checked, {len(report.damaged)} damaged"
        if report.old_format:
            line += (f", {report.old_format} of store format 1 (no checksums: only unreadable data is found; "
                     "re-run the stage with --force to rewrite them)")
        click.echo(line)
        for vid, reason in sorted(report.damaged.items()):
            click.echo(f"  {vid}: {reason}")
        if report.damaged:
            click.echo(f"  re-run `pipeline {key.split('/')[0]}` to recompute them")
        damaged += len(report.damaged)
    if damaged:
        raise SystemExit(1)
