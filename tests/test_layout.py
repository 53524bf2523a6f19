"""The import graph: the library (pipeline/) never imports the application (stages/) nor Click."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("stages", "click")


def _modules() -> list[Path]:
    return sorted((REPO / "pipeline").rglob("*.py"))


def _imported_roots(path: Path) -> set[str]:
    """Top-level package of every import statement in a file, wherever it sits (lazy imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_scan_finds_imports_at_any_depth(tmp_path):
    # The scan itself, on a hand-written file: a lazy import inside a function counts.
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from stages.cli import main\n    import click.testing\n")
    assert _imported_roots(f) == {"os", "stages", "click"}


def test_no_library_module_imports_stages_or_click():
    offenders = {str(p.relative_to(REPO)): sorted(_imported_roots(p) & set(FORBIDDEN)) for p in _modules()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert len(_modules()) > 20 and not offenders, offenders


def test_importing_every_library_module_loads_neither_stages_nor_click():
    names = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in _modules()]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
            "print('LOADED', len([m for m in sys.modules if m.startswith('pipeline')]), bad)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("LOADED"))
    assert int(line.split()[1]) >= len(names) and line.endswith("[]"), line
