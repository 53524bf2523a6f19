"""One module per pipeline stage; each declares a ``STAGE`` (see :class:`pipeline.cache.Stage`).

:func:`all_stages` lists them in pipeline order; the CLI makes one command of each.
"""
from __future__ import annotations

import importlib

#: Stage modules in pipeline order.
STAGE_MODULES = ("decode", "extract_flow", "extract_features", "train_head", "evaluate")


def all_stages() -> list:
    return [importlib.import_module(f"stages.{m}").STAGE for m in STAGE_MODULES]


def extra_commands() -> list:
    """Commands that are not stages (tools such as flow-pair), from the stage modules that define them."""
    out = []
    for m in STAGE_MODULES:
        out.extend(getattr(importlib.import_module(f"stages.{m}"), "COMMANDS", ()))
    return out
