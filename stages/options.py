"""Click options generated from stage parameter dataclasses, shared by every command."""
from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import click

from pipeline.stage import config as cfg
from pipeline.stage.validate import option_name


def _click_type(params_type: type, f: dataclasses.Field):
    tp = cfg._base(typing.get_type_hints(params_type)[f.name])
    if f.metadata.get("choices"):
        return click.Choice(list(f.metadata["choices"]))
    if tp is Path:
        return click.Path(path_type=Path)
    if tp in (int, float):
        return tp
    return str


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def param_options(params_type: type, only: set[str] | None = None):
    """Decorator adding one option per parameter field (``--short-side``, ``--frame-codec``, ...).

    ``only`` restricts it to some fields. A trailing underscore is dropped (``lambda_`` -> ``--lambda``).
    ``metadata["aliases"]`` adds other spellings of an option (``("--dir",)`` beside ``--direction``).
    """
    hints = typing.get_type_hints(params_type)

    def decorate(fn):
        for f in reversed(dataclasses.fields(params_type)):
            if not f.metadata.get("cli", True) or (only is not None and f.name not in only):
                continue
            flag = option_name(f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{f.metadata.get('help', '')} [default: {_default_text(default)}]"
            if cfg._base(hints[f.name]) is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None,
                                  help=help_text)(fn)
            else:
                fn = click.option(flag, *f.metadata.get("aliases", ()), f.name, type=_click_type(params_type, f), default=None,
                                  help=help_text)(fn)
        return fn

    return decorate


def fail(message: str, code: int) -> None:
    """Print ``Error: message`` to stderr and exit with ``code`` (1: the stage failed, 2: bad input)."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


