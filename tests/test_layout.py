"""The package layout: engine imports no front end, its modules import each other without cycles, and readiness
is decided in one module."""

from __future__ import annotations

import ast
from pathlib import Path

from engine import config

ENGINE = config.ROOT / "engine"
FRONT_ENDS = ("streamlit", "fastapi", "starlette", "uvicorn", "api", "ui")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "engine":  # `from engine import runs` imports engine.runs
                found.update(f"engine.{alias.name}" for alias in node.names)
    return found


def engine_graph() -> dict[str, set[str]]:
    """engine module -> the engine modules it imports."""
    modules = {f"engine.{p.stem}": p for p in ENGINE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_engine_imports_no_front_end() -> None:
    for path in sorted(ENGINE.rglob("*.py")):
        bad = sorted(m for m in imports_of(path) if m.split(".")[0] in FRONT_ENDS)
        assert not bad, f"{path.relative_to(config.ROOT)} imports {bad}: engine must not depend on a front end"


def test_engine_modules_import_each_other_without_cycles() -> None:
    graph = engine_graph()
    assert {"engine.inference", "engine.recipe", "engine.train"} <= set(graph)  # the walk sees the package
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_engine_functions_fit_on_a_screen_or_say_why() -> None:
    """No function in engine/ over 60 lines, unless a comment at its top says why (`Over 60 lines on purpose`)."""
    long = []
    for path in sorted(ENGINE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                head = "\n".join(lines[node.lineno - 1 : node.lineno + 6])
                if "Over 60 lines on purpose" not in head:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_readiness_is_decided_in_one_module() -> None:
    """Outside engine/readiness.py a run's "ready" is only copied (from a Readiness, a record, a row), never worked
    out with a comparison or a literal True, and none of the judge's functions is defined again."""
    judge = ast.parse((ENGINE / "readiness.py").read_text())
    rules = {node.name for node in judge.body if isinstance(node, ast.FunctionDef)}
    assert {"judge", "of_training", "after_tuning", "verdict"} <= rules
    decided = []
    files = [*ENGINE.rglob("*.py"), *(config.ROOT / "api").rglob("*.py"), *(config.ROOT / "app_pages").glob("*.py"),
             config.ROOT / "ui.py"]
    for path in sorted(p for p in files if p.name != "readiness.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            values = []
            if isinstance(node, ast.keyword) and node.arg in ("ready", "val_ready"):
                values.append(node.value)
            elif isinstance(node, ast.Dict):
                values += [v for k, v in zip(node.keys, node.values)
                           if isinstance(k, ast.Constant) and k.value in ("ready", "val_ready")]
            elif isinstance(node, ast.Assign):
                values += [node.value for t in node.targets if isinstance(t, ast.Subscript)
                           and isinstance(t.slice, ast.Constant) and t.slice.value in ("ready", "val_ready")]
            elif isinstance(node, ast.FunctionDef) and node.name in rules:
                decided.append(f"{path.relative_to(config.ROOT)}: def {node.name}")
            for value in values:
                worked_out = isinstance(value, (ast.Compare, ast.BoolOp, ast.UnaryOp)) or (
                    isinstance(value, ast.Constant) and value.value is True)
                if worked_out:
                    decided.append(f"{path.relative_to(config.ROOT)}:{value.lineno}: ready = {ast.unparse(value)}")
    assert not decided, decided
