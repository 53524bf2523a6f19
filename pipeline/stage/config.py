"""Typed stage parameters: defaults from the dataclasses, a TOML config file, then command-line overrides.

A config file has one table per stage, named like the command, plus an optional ``[pipeline]`` table::

    [pipeline]
    cache_dir = "/data/stfn-cache"
    backbone = "resnet101"   # the scope of every stage after extract-flow (finetune's and
    split = 1                # extract-features' --arch, train-head's --backbone, every --split)

    [decode]
    dataset = "ucf101"
    root = "/data/UCF-101"
    splits = "/data/ucfTrainTestlist"

    [train-head]
    head = "stfn"
    segments = 7

Precedence: dataclass default < ``[pipeline]`` scope setting < the stage's table < command-line option.
``[pipeline]`` takes ``cache_dir`` and the two scope settings, ``split`` and ``backbone``: they are the
defaults of every parameter declared with ``scope="split"`` or ``scope="backbone"`` (the split and backbone
that name the per-scope outputs, :mod:`pipeline.io.artifacts`). A table the program does not know (a
misspelt ``[train_head]``) and a key a stage does not take are errors naming the closest known name; every
built params object then goes through :func:`pipeline.stage.validate.validate_params` (types, finite numbers,
ranges) before anything runs.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CACHE_ENV = "PIPELINE_CACHE_DIR"
#: The keys of the ``[pipeline]`` table.
PIPELINE_KEYS = ("cache_dir", "split", "backbone")
REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config file or a parameter value is invalid; the message names the file or the parameter."""


def default_cache_dir() -> Path:
    """``$PIPELINE_CACHE_DIR``, else ``cache/`` at the repository root (or the working directory when installed)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "cache"
    return Path.cwd() / "cache"


def _closest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name.replace("_", "-").lower(), list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_tables(config: Mapping[str, Any], known: Any, path: Path | None = None) -> None:
    """Refuse a table of ``config`` that is not in ``known``, naming the closest known one and listing all."""
    known = sorted(set(known))
    for section in config:
        if section not in known:
            raise ConfigError(f"{path or 'config'}: unknown table [{section}]{_closest(section, known)}; "
                              f"known tables: {', '.join(f'[{k}]' for k in known)}")


def load_config(path: Path | None, tables: Any = None) -> dict[str, dict[str, Any]]:
    """The TOML file at ``path`` as {table: {key: value, "__base__": its folder}} ({} for None).

    ``tables``: the table names the program knows (the command names plus ``pipeline``); any other table is an
    error (:func:`check_tables`). None skips that check.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [table] named after a stage")
    if tables is not None:
        check_tables(data, tables, path)
    for key in data.get("pipeline", {}):
        if key not in PIPELINE_KEYS:
            raise ConfigError(f"{path}: [pipeline] has unknown key {key!r}{_closest(key, PIPELINE_KEYS)}; known: "
                              f"{', '.join(PIPELINE_KEYS)}")
    # Relative paths in a config file are relative to the file's folder.
    return {k: {**v, "__base__": path.parent} for k, v in data.items()}


def _type_of(params_type: type, name: str) -> Any:
    return typing.get_type_hints(params_type)[name]


def _base(tp: Any) -> Any:
    """The concrete type of ``X | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def coerce(params_type: type, name: str, value: Any, *, base: Path | None = None, source: str = "",
           typed: bool = False) -> Any:
    """Convert a config/CLI value to the field's type, with a clear error naming the parameter. ``typed``: the
    value comes from a TOML file, whose numbers are typed (a quoted number is refused)."""
    fld = {f.name: f for f in dataclasses.fields(params_type)}[name]
    tp = _base(_type_of(params_type, name))
    where = f" (in {source})" if source else ""
    if value is None:
        return None
    if typed and tp in (int, float) and isinstance(value, str):
        # A TOML string ("3") where a number belongs: refused, not parsed (the command line's values are text
        # and are parsed; a config file's are typed, and a quoted number there is a slip worth naming).
        raise ConfigError(f"parameter {name!r}{where}: {value!r} is a string, not a {tp.__name__}; write it "
                          f"without quotes")
    try:
        if tp is Path:
            p = Path(value).expanduser()
            return (base / p) if base is not None and not p.is_absolute() else p
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # TOML true is not 1
        if tp is int and isinstance(value, float):
            raise ValueError(value)  # 3.7 is not silently 3

        if tp in (int, float, str):
            out = tp(value)
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            items = value.split(",") if isinstance(value, str) else list(value)
            out = tuple(inner(v) for v in items if str(v).strip() != "")
        else:
            out = value
    except (TypeError, ValueError):
        raise ConfigError(f"parameter {name!r}{where}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") \
            from None
    choices = fld.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"parameter {name!r}{where}: {out!r} is not one of {', '.join(map(str, choices))}")
    return out


def build_params(params_type: type, config: Mapping[str, Mapping[str, Any]], section: str,
                 overrides: Mapping[str, Any], *, config_path: Path | None = None) -> Any:
    """Dataclass defaults, then the config file's ``[section]`` table, then non-None ``overrides``.

    A table's key is the option's name without ``--``, with ``-`` or ``_`` (``short-side``, ``short_side``,
    ``lambda``), or the field's name (``lambda_``)."""
    from pipeline.stage.validate import check_field, validate_params

    values = _given_values(params_type, config, section, overrides, config_path)
    for name, value in values.items():  # as given, before __post_init__ may reset fields that do not apply
        check_field(params_type, name, value)
    params = params_type(**values)
    validate_params(params)  # types, finite numbers, ranges, then the checks across fields: before any work
    return params


def given_params(params_type: type, config: Mapping[str, Mapping[str, Any]], section: str,
                 overrides: Mapping[str, Any], *, config_path: Path | None = None) -> frozenset[str]:
    """The fields :func:`build_params` takes from the user rather than the defaults: the ``[pipeline]`` scope
    settings, the ``[section]`` table's keys and the non-None ``overrides`` (the runner keeps an imported
    output current unless one of them differs from the import's, :func:`pipeline.stage.run_stage`)."""
    return frozenset(_given_values(params_type, config, section, overrides, config_path))


def _given_values(params_type: type, config: Mapping[str, Mapping[str, Any]], section: str,
                  overrides: Mapping[str, Any], config_path: Path | None) -> dict[str, Any]:
    """Field name -> value of everything the user gave (module docstring's precedence), coerced."""
    from pipeline.stage.validate import option_name

    names = {f.name for f in dataclasses.fields(params_type)}
    # A renamed parameter's old name (``recorded_as``) still works as a key; other CLI aliases do not.
    spelled = {option_name(f.metadata["recorded_as"])[2:]: f.name for f in dataclasses.fields(params_type)
               if f.metadata.get("recorded_as")}
    spelled.update({option_name(n)[2:]: n for n in names})
    values: dict[str, Any] = {}
    shared = config.get("pipeline", {})
    for f in dataclasses.fields(params_type):  # the [pipeline] scope settings (split, backbone)
        setting = f.metadata.get("scope")
        if setting and shared.get(setting) is not None:
            value = shared[setting]
            if typing.get_origin(_base(_type_of(params_type, f.name))) is tuple and not isinstance(value, (list, str)):
                value = [value]
            values[f.name] = coerce(params_type, f.name, value, source=f"{config_path} [pipeline] {setting}",
                                    typed=config_path is not None)
    table = dict(config.get(section, {}))
    base = table.pop("__base__", None)
    for key, value in table.items():
        name = key if key in names else spelled.get(key.replace("_", "-"))
        if name is None:
            known = sorted(option_name(n)[2:] for n in names)
            raise ConfigError(f"{config_path or 'config'}: [{section}] has unknown parameter {key!r}"
                              f"{_closest(key, known)}; known: {', '.join(known)}")
        values[name] = coerce(params_type, name, value, base=base, source=f"{config_path} [{section}] {key}",
                              typed=base is not None)
    for name, value in overrides.items():
        if value is not None and name in names:
            values[name] = coerce(params_type, name, value)
    return values


def pipeline_setting(config: Mapping[str, Mapping[str, Any]], key: str) -> Any:
    table = config.get("pipeline", {})
    value = table.get(key)
    if key == "cache_dir" and value is not None:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(table["__base__"]) / p
    return value
