"""Parameter validation in one place (pipeline.stage.validate) and config-file checks (issue 12)."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.stage import StageError, param, run_stage
from pipeline.stage import config as cfg
from pipeline.stage.validate import option_name, validate_params


@dataclass(frozen=True)
class _P:
    lr: float = param(0.1, "x", min=0.0, min_exclusive=True)
    frac: float = param(0.5, "x", min=0.0, max=1.0, max_exclusive=True)
    epochs: int = param(3, "x", min=1)
    weight: float | None = param(None, "x")
    sizes: tuple[float, ...] = param((1.0, 2.0), "x")
    lambda_: float = param(1.0, "x")
    name: str = param("a", "x", choices=("a", "b"))
    root: Path | None = param(None, "x")


def test_hand_cases():
    assert validate_params(_P()) == _P()
    assert validate_params(_P(lr=2, weight=0.5, root=Path("/tmp"))).lr == 2  # an int where a float is declared
    bad = [
        (dict(lr=math.nan), r"^--lr: nan is not a finite number$"),
        (dict(lr=math.inf), r"^--lr: inf is not a finite number$"),
        (dict(weight=-math.inf), r"^--weight: -inf is not a finite number$"),
        (dict(sizes=(1.0, math.nan)), r"^--sizes: nan is not a finite number$"),
        (dict(lambda_=math.nan), r"^--lambda: nan"),
        (dict(lr=0.0), r"^--lr: 0.0 must be > 0.0$"),
        (dict(lr=-1e-3), r"^--lr: -0.001 must be > 0.0$"),
        (dict(frac=1.0), r"^--frac: 1.0 must be < 1.0$"),
        (dict(epochs=0), r"^--epochs: 0 must be >= 1$"),
        (dict(epochs=2.5), r"^--epochs: 2.5 is not an integer$"),
        (dict(epochs="3"), r"^--epochs: '3' is not an integer$"),
        (dict(epochs=True), r"^--epochs: True is not an integer$"),
        (dict(lr="0.1"), r"^--lr: '0.1' is not a number$"),
        (dict(name="c"), r"^--name: 'c' is not one of a, b$"),
        (dict(name=None), r"^--name: a value is required"),
    ]
    for kw, msg in bad:
        with pytest.raises(StageError, match=msg):
            validate_params(_P(**kw))
    assert validate_params(_P(frac=0.0, epochs=1)).frac == 0.0  # bounds that are inclusive


def test_build_params_rejects_truncating_or_bool_numbers(tmp_path):
    with pytest.raises(cfg.ConfigError, match="'epochs'.*2.5 is not a valid int"):
        cfg.build_params(_P, {"s": {"epochs": 2.5}}, "s", {})
    with pytest.raises(cfg.ConfigError, match="'lr'.*True is not a valid float"):
        cfg.build_params(_P, {"s": {"lr": True}}, "s", {})
    with pytest.raises(StageError, match="--lr: nan is not a finite number"):
        cfg.build_params(_P, {"s": {"lr": "nan"}}, "s", {})  # from a config file, too
    with pytest.raises(StageError, match="--frac: 1.5 must be < 1.0"):
        cfg.build_params(_P, {}, "s", {"frac": 1.5})


def _param_types():
    from stages import all_stages
    from stages.ablate import AblateParams

    return [(s.name, s.params_type) for s in all_stages()] + [("ablate", AblateParams)]


def test_every_stage_default_params_are_valid():
    for name, tp in _param_types():
        validate_params(tp())  # the defaults themselves pass (no false alarm)


def _float_options(tp) -> list[str]:
    hints = typing.get_type_hints(tp)
    out = []
    for f in dataclasses.fields(tp):
        base = cfg._base(hints[f.name])
        inner = typing.get_args(base)[0] if typing.get_origin(base) is tuple else base
        if inner is float and f.metadata.get("cli", True) and not f.metadata.get("choices"):
            out.append(option_name(f.name))
    return out


def test_every_float_option_refuses_nan_and_inf_before_work(tmp_path):
    from stages.cli import main

    runner = CliRunner()
    cache = tmp_path / "cache"
    cache.mkdir()
    checked = 0
    for name, tp in _param_types():
        for opt in _float_options(tp):
            for text in ("nan", "inf", "-inf"):
                res = runner.invoke(main, [name, opt, text, "--cache-dir", str(cache)])
                assert res.exit_code == 2, (name, opt, text, res.output)
                assert f"{opt}: {float(text)} is not a finite number" in res.output, (name, opt, res.output)
                assert list(cache.iterdir()) == [], (name, opt)  # nothing written: no work started
                checked += 1
    assert checked >= 3 * 10  # the stages declare well over ten float options (learning rates, weights, ...)


def test_finetune_lr_nan_and_train_head_lr_inf(tmp_path):
    from stages.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["finetune", "--lr", "nan", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and "Error: --lr: nan is not a finite number" in res.output
    res = runner.invoke(main, ["train-head", "--lr", "inf", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 2 and "Error: --lr: inf is not a finite number" in res.output
    assert list(tmp_path.iterdir()) == []


def test_unknown_config_table_names_the_closest(tmp_path):
    from stages.cli import config_tables, main

    conf = tmp_path / "c.toml"
    for table, close in (("train_head", "train-head"), ("trainhead", "train-head"), ("decdoe", "decode")):
        conf.write_text(f"[{table}]\nlr = 0.1\n")
        with pytest.raises(cfg.ConfigError) as e:
            cfg.load_config(conf, config_tables())
        msg = str(e.value)
        assert f"unknown table [{table}] (did you mean '{close}'?)" in msg
        assert "known tables:" in msg and "[pipeline]" in msg and "[extract-features]" in msg
        res = CliRunner().invoke(main, ["decode", "--config", str(conf), "--cache-dir", str(tmp_path / "c")])
        assert res.exit_code == 2 and f"unknown table [{table}]" in res.output
    assert not (tmp_path / "c").exists()
    conf.write_text("[pipeline]\n[decode]\nshort_side = 128\n[train-head]\nlr = 0.01\n")
    assert cfg.load_config(conf, config_tables())["decode"]["short_side"] == 128


def test_unknown_key_in_known_table(tmp_path):
    from stages.cli import main
    from stages.decode import DecodeParams

    conf = tmp_path / "c.toml"
    conf.write_text("[decode]\nshort_sid = 128\n")
    with pytest.raises(cfg.ConfigError, match=r"\[decode\] has unknown parameter 'short_sid' \(did you mean "
                                              r"'short-side'\?\)"):
        cfg.build_params(DecodeParams, cfg.load_config(conf), "decode", {}, config_path=conf)
    res = CliRunner().invoke(main, ["decode", "--config", str(conf), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and "unknown parameter 'short_sid'" in res.output


# ---------------------------------------------------------------------------------------------------------
# Every declared check, from Python (run_stage) and from the command line: refused before any work, one message
# ---------------------------------------------------------------------------------------------------------

def _out_of_range(f: dataclasses.Field, inner: type) -> list:
    """Values just outside the declared range of ``f`` (at an exclusive bound, one step past an inclusive one),
    skipping the values ``also`` accepts."""
    meta, step = f.metadata, 1 if inner is int else 0.5
    out = []
    for bound, sign, exclusive in (("min", -1, "min_exclusive"), ("max", 1, "max_exclusive")):
        if meta.get(bound) is None:
            continue
        v = meta[bound] if meta.get(exclusive) else meta[bound] + sign * step
        while v in meta.get("also", ()):
            v += sign * step
        out.append(inner(v))
    return out


def _range_cases() -> list:
    """(stage, field, value, command-line text) for every declared range of every stage's parameters."""
    from stages import all_stages

    cases = []
    for stage in all_stages():
        hints = typing.get_type_hints(stage.params_type)
        for f in dataclasses.fields(stage.params_type):
            base = cfg._base(hints[f.name])
            is_tuple = typing.get_origin(base) is tuple
            inner = typing.get_args(base)[0] if is_tuple else base
            if inner in (int, float):
                cases += [(stage, f.name, (v,) if is_tuple else v, str(v)) for v in _out_of_range(f, inner)]
    return cases


def _refused_alike(stage, over: dict, args: list, cache: Path) -> str:
    """The message run_stage refuses ``over`` with, checked to be the command line's for ``args``, both before
    any work (nothing written under ``cache``)."""
    from stages.cli import main

    with pytest.raises(StageError) as e:
        run_stage(stage, dataclasses.replace(stage.params_type(), **over), cache)
    res = CliRunner().invoke(main, [stage.name, *args, "--cache-dir", str(cache)])
    assert res.exit_code == 2 and f"Error: {e.value}" in res.output, (stage.name, over, str(e.value), res.output)
    assert not cache.exists() or not any(cache.iterdir()), (stage.name, over)
    return str(e.value)


def test_every_declared_range_is_refused_from_python_and_the_cli_alike(tmp_path):
    from stages import all_stages

    cases = _range_cases()
    for stage, name, value, text in cases:
        msg = _refused_alike(stage, {name: value}, [option_name(name), text], tmp_path / "cache")
        shown = repr(value[0] if isinstance(value, tuple) else value)
        assert msg.startswith(f"{option_name(name)}: {shown} must be "), msg
    assert {s.name for s, *_ in cases} == {s.name for s in all_stages()}  # every stage declares ranges
    assert len(cases) >= 50  # the ~15 checks the stages wrote by hand, now declared, and the others


def test_checks_beyond_ranges_are_refused_from_python_and_the_cli_alike(tmp_path):
    """``check=`` declarations and the checks across fields (``validate()``) also run in run_stage."""
    from stages.decode import STAGE as DECODE
    from stages.evaluate import STAGE as EVALUATE
    from stages.extract_features import STAGE as FEATURES
    from stages.extract_flow import STAGE as FLOW
    from stages.refine import STAGE as REFINE
    from stages.train_head import STAGE as TRAIN_HEAD

    missing = str(tmp_path / "nope.npz")
    cases = [
        (FEATURES, {"views": 5}, ["--views", "5"], "--views: 5 is neither 1 (centre crop) nor 10"),
        (TRAIN_HEAD, {"name": "../x"}, ["--name", "../x"], "--name: '../x' must be a plain folder name"),
        (TRAIN_HEAD, {"min_lr": 0.1}, ["--min-lr", "0.1"], "need --min-lr <= --lr (got 0.1, 0.0001)"),
        (REFINE, {"head_name": "a/b"}, ["--head-name", "a/b"], "--head-name: 'a/b' must be the name of a train-head"),
        (EVALUATE, {"splits": (1, 1)}, ["--splits", "1,1"], "--splits: (1, 1) must list distinct split ids"),
        (EVALUATE, {"external_scores": Path(missing)}, ["--external-scores", missing], "is not a file (not found)"),
        (DECODE, {"dataset": "ucf101"}, ["--dataset", "ucf101"], "--root is required for --dataset ucf101"),
        (FLOW, {"tau": 0.0}, ["--tau", "0"], "tau must be > 0"),
    ]
    for stage, over, args, expect in cases:
        assert expect in _refused_alike(stage, over, args, tmp_path / "cache"), (stage.name, over)


def test_option_name_is_the_one_spelling():
    assert option_name("short_side") == "--short-side" and option_name("lambda_") == "--lambda"
    # a config table takes the same spelling, with - or _
    from stages.extract_flow import FlowParams

    p = cfg.build_params(FlowParams, {"extract-flow": {"lambda": 0.2, "scale-step": 0.5, "inner_iterations": 7}},
                         "extract-flow", {})
    assert (p.lambda_, p.scale_step, p.inner_iterations) == (0.2, 0.5, 7)
