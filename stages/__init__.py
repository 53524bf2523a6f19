"""One module per pipeline stage; each declares a ``STAGE`` (see :class:`pipeline.stage.Stage`).

:func:`all_stages` lists them in pipeline order; the CLI makes one command of each. :data:`CATALOG` names
every command with its module and one-line help, so that ``pipeline --help`` and each command import only
what they need (the stage modules import PyTorch); ``tests/test_cli.py`` checks it against the modules.
"""
from __future__ import annotations

import importlib

#: Stage modules in pipeline order.
STAGE_MODULES = ("decode", "extract_flow", "finetune", "extract_features", "train_head", "refine", "train_net",
                 "evaluate")

#: command name -> (module in stages/, attribute of a plain Click command or None for the module's STAGE, help)
CATALOG: dict[str, tuple[str, str | None, str]] = {
    "decode": ("decode", None,
               "Decode videos to frames (UCF101, HMDB51, folder per class, CSV list, mmaction2 / TSN lists, "
               "Kinetics, Something-Something v2, or the built-in demo)."),
    "extract-flow": ("extract_flow", None, "TV-L1 optical flow between consecutive frames (ours on CPU/CUDA, or "
                     "OpenCV), quantized to uint8."),
    "flow-pair": ("flow_tools", "flow_pair_command", "TV-L1 flow between two images, written as Middlebury .flo."),
    "show-flow": ("flow_tools", "show_flow_command", "Colour-code a stored video's flow for a person to look at."),
    "finetune": ("finetune", None, "Fine-tune the RGB or flow ConvNet of the two-stream network ([STFN] §4.2)."),
    "extract-features": ("extract_features", None, "Pooled RGB and flow backbone features at P positions per "
                         "video ([STFN] §4.2) to Zarr / HDF5."),
    "train-head": ("train_head", None, "Train a temporal head (STFN, STCB, baselines) on the cached features and "
                   "evaluate it."),
    "ablate": ("ablate", "ablate_command", "[STFN]'s ablations (Tables 1-4) and the baselines on the cached "
               "features."),
    "refine": ("refine", None, "Train both backbones and a trained head end to end ([STFN] §4.2, second "
               "training step)."),
    "train-net": ("train_net", None, "Train an end-to-end network (ST-Multiplier [ST-Mult]) from the finetune "
                  "outputs, and test it."),
    "run-all": ("workflow", "run_all_command", "Every stage in order, in one process; fresh stages are skipped."),
    "predict": ("predict", "predict_command", "Top-k classes of new videos with the cache's trained models."),
    "import-rawframes": ("import_rawframes", "import_rawframes_command", "Frames and flow extracted by mmaction2, "
                         "TSN, denseflow or twostreamfusion, as the decode and extract-flow outputs."),
    "export": ("export", "export_command", "The cache's frames, flow, split lists and features in mmaction2's "
               "layout (rawframes tree, lists, per-video .npy features)."),
    "verify": ("verify", "verify_command", "Check every stored video's chunk checksums (frames, flow, features); "
               "list the damaged ones for redo."),
    "report": ("report", "report_command", "One self-contained HTML page of the cache: results, curves, ablation, "
               "flow."),
    "evaluate": ("evaluate", None, "Results table of every finished stream, head, refined model and end-to-end "
                 "network in the cache (+ external scores)."),
}


def all_stages() -> list:
    return [importlib.import_module(f"stages.{m}").STAGE for m in STAGE_MODULES]


def load_command(name: str):
    """The Click command ``name`` (imports its module)."""
    from stages.cli import make_stage_command

    module, attr, _ = CATALOG[name]
    mod = importlib.import_module(f"stages.{module}")
    return make_stage_command(mod.STAGE) if attr is None else getattr(mod, attr)
