"""``import-rawframes``: frames and TV-L1 flow that mmaction2, TSN, denseflow or twostreamfusion extracted,
taken into the cache as the ``decode`` and ``extract-flow`` outputs.

A plain command over two real stage runs: ``decode --dataset rawframes`` (the frames' JPEG bytes copied into
the frame store, the video table from the lists or the official split files) and ``extract-flow --backend
import`` (the flow JPEGs copied into the flow store, or their uint8 codes with a lossless ``--codec``; with
the bound). Both runs go through
:func:`pipeline.stage.run_stage`, so their fingerprints come from the tree (its folders), the layout, the
bound and the index base, a killed import resumes, and ``pipeline status`` shows both fresh afterwards. Every
later stage reads them as usual. See docs/rawframes.md and :mod:`pipeline.interop.rawframes`.
"""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.data.annotations.rawframes import LABEL_SOURCES
from pipeline.interop.rawframes import LAYOUTS
from pipeline.stage import StageError, StageFailures, run_stage
from pipeline.stage import config as cfg
from pipeline.stage.config import ConfigError

#: The datasets whose official split files can label a tree (--dataset): the label sources other than lists.
SPLIT_KINDS = tuple(k for k in LABEL_SOURCES if k != "lists")


def import_params(root: Path, layout: str, *, train_list: Path | None = None, test_list: Path | None = None,
                  dataset: str | None = None, splits: Path | None = None, classes: Path | None = None,
                  flow_bound: float = 20.0, flow_start_index: int | None = None, short_side: int = 0,
                  conf: dict | None = None, config_path: Path | None = None, **decode_over):
    """The (decode, extract-flow) parameters of an import: the config's [decode] / [extract-flow] tables, then
    the rawframes source. Frames are never resized: ``short_side`` (default 0, any size) only checks them."""
    from stages.decode import STAGE as DECODE
    from stages.extract_flow import STAGE as FLOW

    if dataset is None and train_list is None and test_list is None:
        raise StageError("give the labels: --train-list / --test-list (mmaction2 / TSN lists) or --dataset "
                         f"{'|'.join(SPLIT_KINDS)} --splits DIR (the official split files)")
    if dataset is not None and (train_list is not None or test_list is not None):
        raise StageError(f"give either --train-list / --test-list or --dataset {'|'.join(SPLIT_KINDS)}, not both")
    conf = conf or {}
    over = {"dataset": "rawframes", "root": Path(root), "rawframes_layout": layout,
            "rawframes_labels": dataset or "lists", "rawframes_train_list": train_list,
            "rawframes_test_list": test_list, "splits": splits, "classes": classes, "short_side": short_side,
            **{k: v for k, v in decode_over.items() if v is not None}}
    dp = cfg.build_params(DECODE.params_type, conf, DECODE.name, over, config_path=config_path)
    fp = cfg.build_params(FLOW.params_type, conf, FLOW.name,
                          {"backend": "import", "bound": flow_bound, "flow_start_index": flow_start_index},
                          config_path=config_path)
    return dp, fp


def config_snippet(dp, fp) -> str:
    """The [decode] / [extract-flow] TOML tables that make `run-all` and later commands use this import."""
    from pipeline.stage.declare import params_dict
    from stages.decode import DecodeParams
    from stages.extract_flow import FlowParams

    lines = []
    for table, p, default in (("decode", dp, DecodeParams()), ("extract-flow", fp, FlowParams())):
        lines.append(f"[{table}]")
        defaults = params_dict(default)
        for k, v in params_dict(p, only_fingerprinted=True).items():
            if v is not None and v != defaults.get(k):
                lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, bool)
                             else f"{k} = {str(v).lower()}")
    return "\n".join(lines)


def import_rawframes(root: Path, layout: str, cache_root: Path, *, allow_failures: bool = False,
                     force: bool = False, **kw):
    """Run the two stages of an import; returns their two RunResults."""
    from stages.decode import STAGE as DECODE
    from stages.extract_flow import STAGE as FLOW

    dp, fp = import_params(root, layout, **kw)
    first = run_stage(DECODE, dp, cache_root, allow_failures=allow_failures, force=force)
    second = run_stage(FLOW, fp, cache_root, allow_failures=allow_failures, force=force)
    return first, second, (dp, fp)


@click.command("import-rawframes")
@click.option("--root", type=click.Path(path_type=Path), required=True,
              help="The rawframes tree (for twostreamfusion: the folder holding jpegs_256/ and tvl1_flow/).")
@click.option("--layout", type=click.Choice(list(LAYOUTS)), default="mmaction2", show_default=True,
              help="How the tree names frames and flow (docs/rawframes.md).")
@click.option("--train-list", type=click.Path(path_type=Path), default=None,
              help="mmaction2 / TSN list: 'frame_dir total_frames label' (label 0-based).")
@click.option("--test-list", type=click.Path(path_type=Path), default=None, help="The test list, same format.")
@click.option("--classes", type=click.Path(path_type=Path), default=None,
              help="Class names for the lists (one per line in label order, or classInd.txt).")
@click.option("--dataset", type=click.Choice(SPLIT_KINDS), default=None,
              help="Labels from this dataset's official split files (instead of lists).")
@click.option("--splits", type=click.Path(path_type=Path), default=None,
              help="Folder with the official split files (with --dataset).")
@click.option("--flow-bound", type=float, default=20.0, show_default=True,
              help="Bound in pixels the tool quantized the flow with (TSN / mmaction2 / denseflow use 20).")
@click.option("--flow-start-index", type=click.IntRange(0, 1), default=None,
              help="Index of the first flow image [default: the layout's: denseflow 0, others 1].")
@click.option("--short-side", type=int, default=0, show_default=True,
              help="Check every video's frames have this short side (0: any size; frames are never resized).")
@click.option("--frame-codec", type=click.Choice(["jpeg", "raw"]), default=None,
              help="Frame store codec [default: jpeg, the JPEG bytes copied as they are].")
@click.option("--store", type=click.Choice(["zarr", "h5"]), default=None, help="Frame store [default: zarr].")
@click.option("--max-frames", type=int, default=None, help="Import at most this many frames per video.")
@click.option("--allow-missing", is_flag=True, default=None, help="Accept listed videos absent from the tree.")
@click.option("--workers", type=int, default=None, help="Frame import processes [default: one per core].")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config: its [decode] / [extract-flow] tables give the other settings.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--allow-failures", is_flag=True, default=False,
              help="Finish with exit status 0 even if some videos failed their checks (they are recorded).")
@click.option("--force", is_flag=True, default=False, help="Re-import even if fresh.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
def import_rawframes_command(root, layout, train_list, test_list, classes, dataset, splits, flow_bound,
                             flow_start_index, short_side, frame_codec, store, max_frames, allow_missing, workers,
                             config_path, cache_dir, allow_failures, force, verbose):
    """Frames and TV-L1 flow extracted by mmaction2, TSN, denseflow or twostreamfusion, as the decode and
    extract-flow outputs (JPEG bytes copied, flow codes kept with their bound).

    \b
    Examples:
      pipeline import-rawframes --root data/ucf101/rawframes --layout mmaction2 \\
          --train-list ucf101_train_split_1_rawframes.txt --test-list ucf101_val_split_1_rawframes.txt
      pipeline import-rawframes --root ucf101_tvl1 --layout twostreamfusion --dataset ucf101 --splits ucfTrainTestlist
    """
    from stages.cli import config_tables, resolve_cache_dir, setup_logging
    from stages.options import fail

    setup_logging(verbose)
    try:
        conf = cfg.load_config(config_path, config_tables())
        cache_root = resolve_cache_dir(cache_dir, conf)
        first, second, (dp, fp) = import_rawframes(
            root, layout, cache_root, allow_failures=allow_failures, force=force, train_list=train_list,
            test_list=test_list, dataset=dataset, splits=splits, classes=classes, flow_bound=flow_bound,
            flow_start_index=flow_start_index, conf=conf, config_path=config_path, short_side=short_side,
            frame_codec=frame_codec, store=store, max_frames=max_frames, allow_missing=allow_missing,
            workers=workers)
    except StageFailures as e:
        fail(str(e), 1)
    except (StageError, ConfigError) as e:
        fail(str(e), 2)
    click.echo(first.message)
    click.echo(second.message)
    click.echo("Later commands and run-all use this import with these config tables (or the same options):\n"
               + config_snippet(dp, fp))
