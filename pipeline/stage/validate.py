"""One check of every stage's parameters: types right, numbers finite and in range.

:func:`validate_params` works on any stage parameter dataclass. It reads each field's type hint and its
:func:`pipeline.stage.param` metadata and raises :class:`pipeline.stage.StageError` naming the option
(``--lr``) and the value. A check on one parameter is declared with it:

- ``min``, ``max`` (inclusive unless ``min_exclusive`` / ``max_exclusive``): the range of a number, or of each
  item of a tuple;
- ``also``: values accepted outside that range, such as ``-1`` or ``0`` meaning "automatic"
  (``param(0, ..., min=16, also=(0,))``);
- ``choices``: the values allowed;
- ``check``: ``check(value) -> None or the problem`` for anything else (a pattern, distinct items, a file that
  must exist), e.g. :func:`existing_file`.

A check across parameters (``--min-lr <= --lr``) is the params class's ``validate()`` method, which
:func:`validate_params` calls last. It runs in :func:`pipeline.stage.config.build_params` and in
:func:`pipeline.stage.run_stage`, so a Python caller gets the same checks and messages as the command line,
before any work and before upstream outputs are looked at: ``--lr nan`` exits 2 at once rather than training a
network full of NaN. :func:`option_name` is the one spelling rule of an option (``--short-side``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from pipeline.stage import StageError

__all__ = ["check_field", "existing_file", "option_name", "validate_params"]


def option_name(name: str) -> str:
    """The command-line spelling of a field: ``lambda_`` -> ``--lambda``, ``short_side`` -> ``--short-side``."""
    return "--" + name.rstrip("_").replace("_", "-")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional
    return tp, tp is Any


def _check_value(opt: str, tp: Any, value: Any, meta: dict) -> None:
    shown = repr(value)
    if tp is Any:
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise StageError(f"{opt}: {shown} is not a boolean (true/false)")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise StageError(f"{opt}: {shown} is not an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StageError(f"{opt}: {shown} is not a number")
        if not math.isfinite(value):
            raise StageError(f"{opt}: {shown} is not a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise StageError(f"{opt}: {shown} is not a string")
    elif tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise StageError(f"{opt}: {shown} is not a path")
        return
    elif typing.get_origin(tp) is tuple:
        if not isinstance(value, (tuple, list)):
            raise StageError(f"{opt}: {shown} is not a list of values")
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        for item in value:
            _check_value(opt, inner, item, meta)
        return
    else:
        return  # other annotations (dicts, unions of several types) are the stage's own business
    choices = meta.get("choices")
    if choices and value not in choices:
        raise StageError(f"{opt}: {shown} is not one of {', '.join(map(str, choices))}")
    if tp in (int, float) and value not in meta.get("also", ()):
        lo, hi = meta.get("min"), meta.get("max")
        also = "".join(f" or {v}" for v in meta.get("also", ()))
        if lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo):
            raise StageError(f"{opt}: {shown} must be {'>' if meta.get('min_exclusive') else '>='} {lo}{also}")
        if hi is not None and (value >= hi if meta.get("max_exclusive") else value > hi):
            raise StageError(f"{opt}: {shown} must be {'<' if meta.get('max_exclusive') else '<='} {hi}{also}")


def check_field(params_type: type, name: str, value: Any) -> Any:
    """Check one value for field ``name`` of the dataclass ``params_type`` (see :func:`validate_params`).

    :func:`pipeline.stage.config.build_params` checks every given value with it before building the params
    object, whose ``__post_init__`` may reset a field that does not apply (so a NaN given there is still
    reported rather than silently dropped)."""
    f = {f.name: f for f in dataclasses.fields(params_type)}[name]
    tp, optional = _split_optional(typing.get_type_hints(params_type).get(name, Any))
    if value is None:
        if optional or tp is Any:
            return value
        raise StageError(f"{option_name(name)}: a value is required (got None)")
    _check_value(option_name(name), tp, value, dict(f.metadata))
    check = f.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise StageError(f"{option_name(name)}: {value!r} {problem}")
    return value


def existing_file(value: Any) -> str | None:
    """A ``check=`` for a path that must name an existing file."""
    return None if Path(value).is_file() else "is not a file (not found)"


def validate_params(params: Any) -> Any:
    """Check every field of the dataclass ``params`` against its type hint and declared checks, then the
    params' own ``validate()`` (the checks across fields) when it has one; returns ``params``.

    Floats must be finite (NaN and infinity are refused), ints must be ints (a float or a string is refused;
    an int is accepted where a float is declared), ``X | None`` fields may be None, tuple fields are checked
    item by item. Raises :class:`StageError` ``"--lr: nan is not a finite number"``.
    """
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        raise TypeError(f"validate_params expects a dataclass instance, got {type(params).__name__}")
    for f in dataclasses.fields(params):
        check_field(type(params), f.name, getattr(params, f.name))
    validate = getattr(params, "validate", None)
    if callable(validate):
        validate()
    return params
