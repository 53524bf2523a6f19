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


# ----------------------------------------------------------------------------------------------------------
# The import graph of pipeline/: no cycle, lazy imports included
# ----------------------------------------------------------------------------------------------------------

def _module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file for every module of ``package`` under ``root`` (a package is its __init__)."""
    out = {}
    for p in sorted((root / package).rglob("*.py")):
        parts = p.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _import_edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that importing ``name`` may execute: every import statement wherever it sits
    (a function-level import runs when the function is called), relative ones resolved, ``from a import b``
    naming module ``a.b`` when it is one; plus the packages above each target (Python runs their
    ``__init__`` first) except those above ``name`` itself, which are already being imported."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    edges = set()
    for t in targets:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            m = ".".join(parts[:i])
            if m in modules and not (name == m or name.startswith(m + ".")):
                edges.add(m)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = _module_files(root, package)
    return {m: _import_edges(m, p, modules) for m, p in modules.items()}


def test_cycle_scan_finds_function_level_and_package_cycles(tmp_path):
    # The scan itself, on hand-written packages whose cycles are known.
    pkg = tmp_path / "lib"
    (pkg / "io").mkdir(parents=True)
    (pkg / "stage").mkdir()
    for init in ("__init__.py", "io/__init__.py"):
        (pkg / init).write_text("")
    (pkg / "io" / "art.py").write_text("import os\ndef f():\n    from lib.stage.declare import g\n")
    (pkg / "stage" / "declare.py").write_text("def g():\n    from ..io import art\n")
    (pkg / "stage" / "__init__.py").write_text("from lib.stage.declare import g\n")
    (pkg / "leaf.py").write_text("from lib.stage import declare\n")
    graph = _graph(tmp_path, "lib")
    assert graph["lib.stage"] == {"lib.stage.declare"}  # its own package is not an edge of declare
    assert graph["lib.leaf"] == {"lib.stage", "lib.stage.declare"}
    assert _cycles(graph) == [["lib.io.art", "lib.stage", "lib.stage.declare"]]
    (pkg / "stage" / "declare.py").write_text("def g():\n    return 1\n")
    assert _cycles(_graph(tmp_path, "lib")) == []


def test_no_import_cycle_in_the_library():
    graph = _graph(REPO, "pipeline")
    assert len(graph) > 20 and "pipeline.stage.keys" in graph
    assert _cycles(graph) == []


def test_the_cache_layout_module_imports_nothing_of_the_pipeline():
    """``pipeline.stage.keys`` is the leaf every layer may import (stage names, keys, file names)."""
    graph = _graph(REPO, "pipeline")
    assert graph["pipeline.stage.keys"] == set()
    assert {"pipeline.stage.keys"} <= graph["pipeline.io.artifacts"] & graph["pipeline.stage.manifest"]


# ----------------------------------------------------------------------------------------------------------
# stages/: a stage module imports no other stage module
# ----------------------------------------------------------------------------------------------------------

#: What a module that declares a STAGE may import from stages/ (Click options only; stages reach each other's
#: outputs through pipeline.io.artifacts). The commands without a STAGE (workflow, ablate, predict,
#: import_rawframes, flow_tools, cli) run stages and may import them: docs/architecture.md.
STAGE_MAY_IMPORT = {"stages.options"}


def _declares_stage(path: Path) -> bool:
    return any(isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "STAGE" for t in node.targets)
               for node in ast.parse(path.read_text()).body)


def _stage_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    return {m for m in _import_edges(name, path, modules) if m != "stages"}


def test_stage_scan_sees_lazy_imports_of_stage_modules(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "options.py").write_text("")
    (tmp_path / "stages" / "head.py").write_text("STAGE = 1\n")
    (tmp_path / "stages" / "refine.py").write_text("STAGE = 2\ndef plan():\n    from .head import STAGE\n"
                                                   "from stages.options import x\n")
    modules = _module_files(tmp_path, "stages")
    assert _declares_stage(modules["stages.refine"]) and not _declares_stage(modules["stages.options"])
    assert _stage_imports("stages.refine", modules["stages.refine"], modules) == {"stages.head", "stages.options"}


def test_no_stage_module_imports_another_stage_module():
    from stages import STAGE_MODULES

    modules = _module_files(REPO, "stages")
    declaring = {m for m, p in modules.items() if _declares_stage(p)}
    assert {f"stages.{m}" for m in STAGE_MODULES} <= declaring
    offenders = {m: sorted(_stage_imports(m, modules[m], modules) - STAGE_MAY_IMPORT) for m in sorted(declaring)}
    assert not {m: v for m, v in offenders.items() if v}, offenders



# ----------------------------------------------------------------------------------------------------------
# Which way the imports go inside the library (docs/architecture.md)
# ----------------------------------------------------------------------------------------------------------

#: A package -> (the packages it may not import, lazily or not; the modules among them it may). Data is read by
#: training, never the other way; the models take what they need (the streams' names, a checkpoint converter)
#: as arguments or from the leaf module pipeline.streams, and may read the sampling rules (numpy only:
#: FstCN's test-time frame).
LAYERS = {
    "pipeline.data": (("pipeline.training",), ()),
    "pipeline.models": (("pipeline.data", "pipeline.interop", "pipeline.training"),
                        ("pipeline.data", "pipeline.data.sampling")),
}


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _layer_breaks(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    out = {}
    for m, targets in graph.items():
        for package, (forbidden, allowed) in LAYERS.items():
            bad = sorted(t for t in targets if _within(t, forbidden) and t not in allowed)
            if _within(m, (package,)) and bad:
                out[m] = bad
    return out


def test_layer_scan_sees_lazy_and_relative_imports(tmp_path):
    for sub in ("data", "training", "models", "interop"):
        (tmp_path / "pipeline" / sub).mkdir(parents=True)
        (tmp_path / "pipeline" / sub / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "training" / "heads.py").write_text("")
    (tmp_path / "pipeline" / "interop" / "checkpoints.py").write_text("")
    (tmp_path / "pipeline" / "data" / "paired.py").write_text("def f():\n    from ..training.heads import g\n")
    (tmp_path / "pipeline" / "models" / "backbones.py").write_text("from pipeline.interop import checkpoints\n")
    (tmp_path / "pipeline" / "data" / "sampling.py").write_text("")
    (tmp_path / "pipeline" / "data" / "clips.py").write_text("")
    (tmp_path / "pipeline" / "models" / "fstcn.py").write_text("from pipeline.data.sampling import f\n")
    (tmp_path / "pipeline" / "models" / "heads.py").write_text("from ..data import clips\n")
    assert _layer_breaks(_graph(tmp_path, "pipeline")) == {
        "pipeline.data.paired": ["pipeline.training", "pipeline.training.heads"],
        "pipeline.models.backbones": ["pipeline.interop", "pipeline.interop.checkpoints"],
        "pipeline.models.heads": ["pipeline.data.clips"]}


def test_library_layers():
    assert _layer_breaks(_graph(REPO, "pipeline")) == {}


def test_streams_is_a_leaf_module():
    tree = ast.parse((REPO / "pipeline" / "streams.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_nothing_reads_the_streams_from_their_old_home():
    """``pipeline.data.STREAMS`` is kept for one release; the code reads ``pipeline.streams`` (so that the
    models import nothing of ``pipeline.data`` for it)."""
    old = []
    for p in sorted(f for d in ("pipeline", "stages", "bench") for f in (REPO / d).rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and node.module in ("pipeline.data", "pipeline.data.clips") and \
                    any(a.name == "STREAMS" for a in node.names):
                old.append(str(p.relative_to(REPO)))
    assert old == []
