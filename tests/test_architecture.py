"""The package's shape: no import cycles among kdfuse's modules (imports inside functions
included), a reference that depends on no part of the engine, short functions, and the
autotune package knowing nothing about KD. Read from the source (AST), so these run anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdfuse"
# The engine: the reference, which states the semantics, may import none of these.
ENGINE = {
    "chunk",
    "compiled",
    "engine",
    "fused",
    "sweep",
    "tuning",
    "triton_cast",
    "triton_chunk",
    "triton_mm",
    "triton_topk",
}
MAX_FUNCTION_LINES = 60  # bodies outside the Triton kernels (@triton.jit), docstrings not counted


def _modules(package: Path) -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(package.glob("*.py"))}


def _imports(name: str, tree: ast.Module, package: str = "kdfuse", relative: bool = True) -> set[str]:
    """The package's modules ``name`` imports, anywhere in it (module level or inside functions);
    ``relative``: ``tree`` is one of the package's own modules, so ``from . import x`` counts."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and relative:  # from . import x / from .x import y
                base = node.module
                found |= {base.split(".")[0]} if base else {alias.name for alias in node.names}
            elif node.module and node.module.split(".")[0] == package:
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == package:
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_no_import_cycles_among_kdfuse_modules():
    modules = _modules(PACKAGE)
    graph = {name: _imports(name, tree) for name, tree in modules.items() if name != "__init__"}
    graph = {name: {m for m in deps if m != "__init__"} for name, deps in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    # No module imports the package itself (its __init__ imports them all).
    assert not [name for name, tree in modules.items() if name != "__init__" and "__init__" in _imports(name, tree)]


def test_the_reference_imports_nothing_of_the_engine():
    tree = _modules(PACKAGE)["reference"]
    assert not _imports("reference", tree) & ENGINE


def test_autotune_knows_nothing_about_kd():
    for name, tree in _modules(ROOT / "autotune").items():
        assert not _imports(name, tree, package="kdfuse", relative=False), name
        assert "kdfuse" not in ast.dump(tree).replace("'kdfuse'", ""), name


def _is_triton_kernel(node: ast.FunctionDef) -> bool:
    return any("triton" in ast.unparse(d) or ast.unparse(d) == "jit" for d in node.decorator_list)


def _code_lines(node: ast.FunctionDef) -> int:
    """Lines of a function's body, without its signature and docstring."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("package", ["kdfuse", "autotune"])
def test_functions_are_short(package):
    long = []
    for name, tree in _modules(ROOT / package).items():
        for node in ast.walk(tree):
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and not _is_triton_kernel(node) and _code_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long, long


# --- the tests' own shape ------------------------------------------------------------------------

TESTS = ROOT / "tests"


def _test_modules() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text(), str(path)) for path in sorted(TESTS.glob("*.py"))}


def test_no_test_module_imports_another():
    """Shared code lives in helpers.py (fixtures in conftest.py): a test module imported by
    another would run its tests twice under some import modes and couple unrelated units."""
    found = []
    for name, tree in _test_modules().items():
        for node in ast.walk(tree):
            modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            found += [f"{name}: {m}" for m in modules if m.split(".")[0].startswith(("test_", "conftest", "bench_"))]
    assert not found, found


def _decorator_names(node: ast.FunctionDef) -> set[str]:
    names = set()
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def test_hypothesis_draws_the_data_not_a_seed():
    """A @given test or a composite strategy draws the tensors themselves (helpers' strategies),
    so a failure shrinks to simple values: no drawn ``seed``, no torch generator seeded inside."""
    found = []
    for name, tree in _test_modules().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or not _decorator_names(node) & {"given", "composite"}:
                continue
            given_args = [kw.arg for d in node.decorator_list if isinstance(d, ast.Call) for kw in d.keywords]
            seeded = "seed" in given_args or "seed" in [a.arg for a in node.args.args]
            seeded |= "manual_seed" in ast.dump(node) or 'label="seed"' in ast.unparse(node)
            if seeded:
                found.append(f"{name}: {node.name}")
    assert not found, found


def test_dynamo_is_never_reset_without_a_reason():
    """Graph counts are differences of Dynamo's counters (test_compile.py): a reset would hide a
    shared recompile limit. A test that truly needs a clean slate says why on the line above."""
    found = []
    for name, tree in _test_modules().items():
        lines = (TESTS / name).read_text().splitlines()
        for node in ast.walk(tree):
            func = node.func if isinstance(node, ast.Call) else None
            resets = isinstance(func, ast.Attribute) and func.attr == "reset" and "_dynamo" in ast.unparse(func.value)
            if resets and not lines[node.lineno - 2].strip().startswith("#"):
                found.append(f"{name}:{node.lineno}")
    assert not found, found
