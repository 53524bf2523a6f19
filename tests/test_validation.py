"""Parameter validation in one place (pipeline.stage.validate) and config-file checks (issue 12)."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.stage import StageError, param
from pipeline.stage import config as cfg
from pipeline.stage.validate import validate_params


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
            out.append("--" + f.name.rstrip("_").replace("_", "-"))
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
