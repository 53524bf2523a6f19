"""Every shipped config builds valid parameters for every stage it configures (no typos, no bad values)."""
from pathlib import Path

import pytest

from pipeline.stage import config as cfg
from stages import all_stages
from stages.ablate import AblateParams
from stages.workflow import RunAllParams

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_every_stage(path):
    conf = cfg.load_config(path)
    known = {s.name: s for s in all_stages()}
    extra = {"ablate": AblateParams, "run-all": RunAllParams}
    for section in conf:
        assert section in known or section in extra or section == "pipeline", f"{path}: unknown [{section}]"
    for name, stage in known.items():
        over = {"stream": "flow"} if name == "finetune" else {}
        cfg.build_params(stage.params_type, conf, name, over, config_path=path)
    for name, params_type in extra.items():
        cfg.build_params(params_type, conf, name, {}, config_path=path)
    assert cfg.pipeline_setting(conf, "cache_dir") is None or isinstance(cfg.pipeline_setting(conf, "cache_dir"),
                                                                          Path)


def test_demo_config_lists_every_results_row():
    conf = cfg.load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml")
    heads = cfg.build_params(RunAllParams, conf, "run-all", {}).heads
    assert {"stfn", "stcb", "rgb", "flow", "late", "tsn", "concat"} <= set(heads)


def test_demo_run_all_trains_the_stmult_network_with_its_table():
    """[run-all] nets = ["stmult"]: a train-net step after refine, with the [train-net] table's settings on the
    demo's scope (split 1, ResNet-18), evaluated with the other rows."""
    from stages.workflow import _steps

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
    conf = cfg.load_config(path)
    steps = _steps(conf, path, cfg.build_params(RunAllParams, conf, "run-all", {}))
    labels = [label for label, *_ in steps]
    assert labels.index("refine") < labels.index("train-net stmult") < labels.index("evaluate")
    p = next(params for label, _, params, _ in steps if label == "train-net stmult")
    table = conf["train-net"]
    assert (p.net, p.split, p.backbone) == ("stmult", 1, "resnet18")
    assert (p.epochs, p.lr_steps, p.dropout, p.batch_size, p.micro_batch) == (
        table["epochs"], tuple(table["lr_steps"]), table["dropout"], table["batch_size"], table["micro_batch"])


def test_renamed_parameter_keeps_its_old_name_in_fingerprints_and_configs(tmp_path):
    """extract-features --format became --store: runs recorded under "format" stay fresh, and the old option
    and config key still work."""
    from click.testing import CliRunner

    from pipeline.stage import params_dict
    from stages.cli import main
    from stages.extract_features import ExtractFeaturesParams

    p = ExtractFeaturesParams(store="h5")
    assert params_dict(p, only_fingerprinted=True)["format"] == "h5" and "store" not in params_dict(p)
    for key in ("store", "format"):
        (tmp_path / f"{key}.toml").write_text(f'[extract-features]\n{key} = "h5"\n')
        built = cfg.build_params(ExtractFeaturesParams, cfg.load_config(tmp_path / f"{key}.toml"), "extract-features", {})
        assert built.store == "h5", key
    for flag in ("--store", "--format"):
        res = CliRunner().invoke(main, ["extract-features", flag, "nonsense", "--cache-dir", str(tmp_path / "c")])
        assert res.exit_code != 0 and "nonsense" in res.output and "is not one of" in res.output, res.output
