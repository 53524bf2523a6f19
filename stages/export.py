"""``export``: the cache's frames, flow, split lists and features in another tool's layout (mmaction2).

A plain command (it writes outside the cache and only reads it). See :mod:`pipeline.interop.mmaction2` and
docs/rawframes.md.
"""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.stage import StageError
from pipeline.stage.config import ConfigError


@click.command("export")
@click.option("--format", "fmt", type=click.Choice(["mmaction2"]), default="mmaction2", show_default=True,
              help="Layout to write.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Folder to write into.")
@click.option("--what", default=None,
              help="Comma-separated parts: frames, flow, lists, features [default: every part the cache has].")
@click.option("--name", default=None, help="Dataset name in the list file names [default: decode's dataset].")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality of images that are encoded (flow, raw-stored frames); JPEG frames are copied.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="TOML config.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def export_command(fmt, output, what, name, quality, cache_dir, config_path, verbose):
    """The cache in mmaction2's layout: rawframes tree (<Class>/<video>/img_%05d.jpg, flow_x_/flow_y_, 1-based),
    {dataset}_{train,val}_split_{k}_rawframes.txt lists, and per-video <video>.npy features (positions, D) per
    stream for temporal-localization tools.

    \b
    Example:
      pipeline export --format mmaction2 -o data/ucf101 --what frames,flow,lists
    """
    from tqdm import tqdm

    from pipeline.data.table import VideoTable
    from pipeline.interop.mmaction2 import export_mmaction2
    from pipeline.io import artifacts
    from stages.cli import cache_root_from, setup_logging
    from stages.options import fail

    setup_logging(verbose)
    root = cache_root_from(cache_dir, config_path)
    parts = [w.strip() for w in what.split(",") if w.strip()] if what else None
    try:
        total = len(VideoTable.load(root / artifacts.DECODE)) if (root / artifacts.DECODE).exists() else 0
        with tqdm(total=total, desc="export", unit="video", dynamic_ncols=True) as bar:
            counts = export_mmaction2(root, output, parts, name=name, quality=quality, progress=bar.update)
    except (StageError, ConfigError, FileNotFoundError, artifacts.ArtifactError) as e:
        fail(str(e), 2)
    click.echo(f"export: {', '.join(counts['what'])} to {output}: {counts['videos']} video folders written "
               f"({counts['kept']} already there, kept), {counts['lists']} lists, {counts['features']} feature "
               "files")
