"""The package's import graph has no cycles: none among module-level imports, and none counting the imports
inside functions either (they used to tie the layers together: cli <-> runtime.cli, awq <-> quantize, models ->
backends, healing -> pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for file in SOURCE.rglob("*.py"):
        parts = list(file.relative_to(SOURCE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(modules: dict[str, Path], lazy: bool) -> dict[str, set[str]]:
    """module -> the layerwise modules it imports (at module level, or anywhere when ``lazy``; never the
    imports under ``if TYPE_CHECKING``, which do not run)."""
    graph = {}
    for name, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"))
        package = name.split(".") if file.name == "__init__.py" else name.split(".")[:-1]
        skipped = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
        nodes = ast.walk(tree) if lazy else iter(tree.body)
        found = set()
        for node in nodes:
            if id(node) in skipped or not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").startswith("layerwise"):
                base = node.module
            else:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_level_import_cycle():
    assert _cycle(_imports(_modules(), lazy=False)) is None


def test_no_import_cycle_counting_the_imports_inside_functions():
    """Issue 38's acceptance: the full graph, function-level imports included, has no cycle (the last one:
    healing imported ``ensure_output_free`` from the pipeline that runs it; it lives in ``cache`` now)."""
    assert _cycle(_imports(_modules(), lazy=True)) is None


def test_the_layers_once_tied_by_function_level_imports_are_apart():
    graph = _imports(_modules(), lazy=True)
    assert "layerwise.cli" not in graph["layerwise.runtime.cli"]
    assert "layerwise.ops.quantize" not in graph["layerwise.ops.awq"]
    assert not any(target.startswith("layerwise.ops") for module, targets in graph.items()
                   if module.startswith("layerwise.models") for target in targets)
    assert not any(target.startswith("layerwise.options") for module, targets in graph.items()
                   if module.startswith("layerwise.structures") for target in targets)


# The only imports the package makes inside functions (shared/DESIGN.md, "Imports"): optional dependencies, and
# required ones that cost seconds to import on every command that does not use them (measured beside torch and
# transformers on the 2-core machine: peft +4 s, datasets +1.3 s, ray +1 s).
DEFERRED_IMPORTS = {
    "llama_cpp": "the llama extra",
    "pynvml": "the gpu extra",
    "sklearn": "the dev extra (the runtime benchmark's reference regressions)",
    "peft": "LoRA healing and recovery only",
    "ray": "joint search on Ray workers only",
    "lm_eval": "zero-shot scoring only",
    "datasets": "zero-shot scoring only (lm-eval's documents)",
}


def _function_level_imports() -> list[tuple[str, int, str]]:
    """(file, line, top-level module) of every import inside a function or class body of the package."""
    found = []
    for file in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        module_level = {id(n) for node in tree.body for n in ast.walk(node)
                        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in module_level:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                top = "." if isinstance(node, ast.ImportFrom) and node.level else names[0].split(".")[0]
                found.append((str(file.relative_to(SOURCE)), node.lineno, top))
    return found


def test_functions_import_only_deferred_dependencies():
    """Issue 38: no import hides inside a function (they once held a 28-file circle together at import time),
    apart from the optional or slow third-party modules named in ``DEFERRED_IMPORTS``."""
    hidden = [f"{file}:{line} imports {top}" for file, line, top in _function_level_imports()
              if top not in DEFERRED_IMPORTS]
    assert hidden == []
    assert {top for *_, top in _function_level_imports()} == set(DEFERRED_IMPORTS)  # the list has no stale entry


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_layers_of_the_design_hold(capsys):
    """import-linter's layers contract in pyproject.toml (shared/DESIGN.md's layering): every import, those inside
    functions included, goes to the module's own layer or below; the contract ignores no import."""
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(SOURCE.parent / "pyproject.toml"), no_cache=True, no_logo=True) == 0, \
        capsys.readouterr().out


def test_the_layers_contract_catches_an_import_that_climbs(tmp_path):
    """The contract fails when a module imports a layer above its own: the engines moved to the bottom layer
    still import the measure and cost modules that are then above them."""
    from importlinter.cli import lint_imports

    climbing = tmp_path / "pyproject.toml"
    text = (SOURCE.parent / "pyproject.toml").read_text(encoding="utf-8")
    climbing.write_text(text.replace('"layerwise.config : ', '"layerwise.engines : layerwise.config : ').replace(
        '"layerwise.ops : layerwise.engines : ', '"layerwise.ops : '), encoding="utf-8")
    assert lint_imports(config_filename=str(climbing), no_cache=True, no_logo=True) == 1


def test_every_module_of_the_package_has_a_layer():
    """A module the layers contract does not name is checked by nothing: each top-level module and package is in
    one layer of pyproject.toml's contract."""
    import tomllib

    config = tomllib.loads((SOURCE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    layers = config["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip().removeprefix("layerwise.") for layer in layers for name in layer.split(":")}
    package = SOURCE / "layerwise"
    present = {path.stem for path in package.glob("*.py") if path.stem != "__init__"} | {
        path.name for path in package.iterdir() if (path / "__init__.py").is_file()}
    assert present - named == set()
