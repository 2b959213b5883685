"""The layout's rules, checked on the source: layers that import only downwards and never in a cycle, modules
that import alone, and sizes a reader can hold in mind (README, "Architecture")."""

import ast
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = [  # lowest first: a module imports only from its own layer and the layers above it in this list
    ("kernels", ["fastprefix.kernels.common", "fastprefix.kernels.bank", "fastprefix.kernels.tuning", "fastprefix.kernels.forward",
                 "fastprefix.kernels.backward", "fastprefix.kernels.decode", "fastprefix.kernels",
                 "fastprefix.kernels.report"]),
    ("foundations", ["fastprefix.checks", "fastprefix.compat", "fastprefix.reference"]),
    ("backends", ["fastprefix.segment_attention", "fastprefix.torch_path", "fastprefix.bank_attention",
                  "fastprefix.level_attention", "fastprefix.triton_path", "fastprefix.dispatch"]),
    ("op", ["fastprefix.ops"]),
    ("model families", ["fastprefix.models.base", "fastprefix.models.llama", "fastprefix.models.t5",
                        "fastprefix.models"]),
    ("patching", ["fastprefix.prefix", "fastprefix.bank", "fastprefix.levels", "fastprefix.patching",
                  "fastprefix.generation"]),
    ("integrations", ["fastprefix.validate", "fastprefix.peft_interop", "fastprefix.trainable"]),
    ("tools", ["fastprefix.testing", "fastprefix.profiling", "fastprefix.presets", "fastprefix.timing",
               "fastprefix.quiet", "fastprefix.bench", "fastprefix.bench_report", "fastprefix.demo",
               "fastprefix.commands", "fastprefix.cli", "fastprefix"]),
]
LAYER_OF = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def package_files() -> dict[str, pathlib.Path]:
    """Module name -> source file of every module of the installed package."""
    found = {}
    for path in (ROOT / "fastprefix").rglob("*.py"):
        parts = ["fastprefix", *path.relative_to(ROOT / "fastprefix").with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules `module` imports, at module level or inside functions; `from X import name` counts
    as an import of X.name where that is a module."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def upward_imports(graph) -> list[str]:
    return [f"{a} (layer {LAYERS[LAYER_OF[a]][0]!r}) imports {b} (layer {LAYERS[LAYER_OF[b]][0]!r})"
            for a, targets in graph.items() for b in targets if LAYER_OF[b] > LAYER_OF[a]]


def cycles(graph) -> list[list[str]]:
    """Every import cycle, found by depth-first search (one path per back edge)."""
    found, state, path = [], {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_every_module_has_a_layer():
    assert set(package_files()) == set(LAYER_OF), "place new modules in LAYERS (and in the README's Architecture)"


def test_imports_go_down_the_layers_without_cycles():
    graph = import_graph()
    assert upward_imports(graph) == []
    assert cycles(graph) == []


def test_the_checks_can_fail(tmp_path):
    """An import up the table, a cycle and a function-level import are all found."""
    graph = {"fastprefix.ops": {"fastprefix.patching"}, "fastprefix.patching": {"fastprefix.prefix"},
             "fastprefix.prefix": {"fastprefix.patching"}}
    assert upward_imports(graph) == [
        "fastprefix.ops (layer 'op') imports fastprefix.patching (layer 'patching')"]
    assert cycles(graph) == [["fastprefix.patching", "fastprefix.prefix", "fastprefix.patching"]]
    source = "from .models import family_of\n\ndef f():\n    from .patching import patch\n"
    path = tmp_path / "prefix.py"
    path.write_text(source)
    assert imports_of("fastprefix.prefix", path, set(LAYER_OF)) == {"fastprefix.models", "fastprefix.patching"}


def _import_alone(module: str) -> tuple[str, int, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                          timeout=300)
    return module, proc.returncode, proc.stderr[-2000:]


def test_each_module_imports_alone_in_a_fresh_interpreter():
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        failed = [result for result in pool.map(_import_alone, sorted(LAYER_OF)) if result[1] != 0]
    assert failed == []


@pytest.mark.parametrize("tree", ["fastprefix", "tests", "bench"])
def test_modules_and_functions_are_short(tree):
    long = []
    for path in sorted((ROOT / tree).rglob("*.py")):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long == []
