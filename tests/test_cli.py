"""The command catalog matches the stage modules; every command and parameter has help and a default."""
import dataclasses
import importlib

from click.testing import CliRunner

from pipeline.stage.validate import option_name
from stages.cli import main
from stages import CATALOG, STAGE_MODULES, all_stages


def test_catalog_matches_modules():
    stage_names = set()
    for name, (module, attr, short) in CATALOG.items():
        mod = importlib.import_module(f"stages.{module}")
        if attr is None:
            assert mod.STAGE.name == name and mod.STAGE.help == short
            stage_names.add(name)
        else:
            assert getattr(mod, attr).name == name
    assert stage_names == {s.name for s in all_stages()}
    assert len(STAGE_MODULES) == len(stage_names)


def test_help_lists_every_command_and_every_parameter_has_help():
    runner = CliRunner()
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0
    for name in CATALOG:
        assert name in res.output
    for stage in all_stages():
        res = runner.invoke(main, [stage.name, "--help"])
        assert res.exit_code == 0, res.output
        for f in dataclasses.fields(stage.params_type):
            assert f.metadata.get("help"), f"{stage.name}: parameter {f.name} has no help text"
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            assert option_name(f.name) in res.output


def test_command_help_is_the_short_help_not_the_module_docstring():
    runner = CliRunner()
    for name, (module, attr, short) in CATALOG.items():
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, res.output
        if attr is None:  # a stage command: its help is the one paragraph of STAGE.help
            doc = importlib.import_module(f"stages.{module}").__doc__ or ""
            description = res.output.split("Options:")[0]
            assert " ".join(short.split()) in " ".join(description.split())
            # No sentence of the developers' module docstring is printed (its first line, for one).
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            assert not first or first not in res.output, f"{name}: module docstring printed as help"
            assert len(description.strip().splitlines()) <= 6, f"{name}: help is {description!r}"
