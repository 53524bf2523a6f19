"""``verify``: find the missing and damaged data of the stored videos (frames, flow, features).

A plain command over :mod:`pipeline.stage.verify`: the videos with missing or damaged data are journaled for
redo, so re-running their stage recomputes exactly them.
"""
from __future__ import annotations

import errno
from pathlib import Path

import click


@click.command("verify")
@click.option("--stage", default=None, help="Only this stage's outputs: decode, extract-flow, extract-features "
              "(or one key, extract-features/split1-resnet101) [default: all three].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def verify_command(stage, cache_dir, config_path, verbose):
    """Check the finished decode, extract-flow and extract-features outputs for missing data (every video the
    journal and the video table list, every array and chunk file, both feature stores) and damaged data (every
    chunk read, its checksum verified); list what is wrong, naming each file (exit status 1 when anything is)
    and mark it so that re-running the stage recomputes only that.

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
        read_only = None
        try:
            mark_for_redo(root, report)
        except OSError as e:  # a read-only cache: the listing is still given
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            read_only = e.filename or root / key
        line = f"{key}: {report.checked} checked, {len(report.damaged)} missing/damaged"
        if report.old_format:
            line += (f", {report.old_format} of store format 1 (no checksums: only unreadable data is found; "
                     "re-run the stage with --force to rewrite them)")
        click.echo(line)
        for finding in report.findings:
            click.echo(f"  {finding}")
        for vid, reason in sorted(report.damaged.items()):
            click.echo(f"  {vid}: {reason}")
        if read_only is not None and report.problems:
            click.echo(f"  cache is read-only: {read_only}; the videos found are not marked for redo")
        elif report.problems:
            click.echo(f"  re-run `pipeline {key.split('/')[0]}` to recompute them")
        damaged += report.problems
    if damaged:
        raise SystemExit(1)
