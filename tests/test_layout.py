"""The package layout: engine imports no front end, its modules import each other without cycles, and readiness
is decided in one module."""

from __future__ import annotations

import ast
from pathlib import Path

from engine import config

ENGINE = config.ROOT / "engine"
FRONT_ENDS = ("streamlit", "fastapi", "starlette", "uvicorn", "api", "app_pages")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module.startswith("engine"):  # `from engine import runs` imports engine.runs
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def engine_graph() -> dict[str, set[str]]:
    """engine module -> the engine modules it imports."""
    modules = {".".join(p.relative_to(config.ROOT).with_suffix("").parts): p for p in ENGINE.rglob("*.py")
               if p.stem not in ("__init__", "__main__")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_engine_imports_no_front_end() -> None:
    for path in sorted(ENGINE.rglob("*.py")):
        bad = sorted(m for m in imports_of(path) if m.split(".")[0] in FRONT_ENDS)
        assert not bad, f"{path.relative_to(config.ROOT)} imports {bad}: engine must not depend on a front end"


def test_engine_modules_import_each_other_without_cycles() -> None:
    graph = engine_graph()
    assert {"engine.inference", "engine.recipe", "engine.train", "engine.training.config"} <= set(graph)
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


def test_no_engine_module_is_over_500_lines() -> None:
    """A module a newcomer reads in one sitting: split by concern past 500 lines."""
    long = [f"{p.relative_to(config.ROOT)} ({n} lines)" for p in sorted(ENGINE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, long


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


def test_run_json_is_opened_in_one_module() -> None:
    """engine/runs.py reads and writes run.json; every other module goes through it (read_run_json,
    write_run_json), so a change of its format has one home."""
    files = [*ENGINE.rglob("*.py"), *(config.ROOT / "api").rglob("*.py"), *(config.ROOT / "app_pages").glob("*.py")]
    opened = []
    for path in sorted(p for p in files if p.name != "runs.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("read_text", "read_bytes", "open", "write_text")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "run_json"):
                opened.append(f"{path.relative_to(config.ROOT)}:{node.lineno}")
    assert not opened, opened


def test_run_json_is_read_as_a_record_outside_its_writers() -> None:
    """Only run.json's writers (runs, runstore, train) read it as a dict to change and write back; every other
    reader goes through runs.read_record, so a field has one name, type and default (engine.runrecord)."""
    writers = {"runs.py", "runstore.py", "train.py"}
    files = [*ENGINE.rglob("*.py"), *(config.ROOT / "api").rglob("*.py"), *(config.ROOT / "app_pages").glob("*.py")]
    raw = []
    for path in sorted(p for p in files if p.name not in writers or p.parent != ENGINE):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name == "read_run_json":
                raw.append(f"{path.relative_to(config.ROOT)}:{node.lineno}")
    assert not raw, raw


def test_a_pages_top_level_fits_on_a_screen() -> None:
    """A page's top level (what runs besides imports and definitions) counts as a function: 60 lines at most, and
    every function of a page fits on a screen too."""
    long = []
    for path in sorted([*(config.ROOT / "app_pages").glob("*.py"), config.ROOT / "Home.py"]):
        tree = ast.parse(path.read_text())
        top = [node for node in tree.body[1:] if not isinstance(
            node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef))]
        lines = sum(node.end_lineno - node.lineno + 1 for node in top)
        if lines > 60:
            long.append(f"{path.name}: top level {lines} lines")
        long += [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                 for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno >= 60]
    assert not long, long


def test_readiness_is_decided_in_one_module() -> None:
    """Outside engine/readiness.py a run's "ready" is only copied (from a Readiness, a record, a row), never worked
    out with a comparison or a literal True, and none of the judge's functions is defined again."""
    judge = ast.parse((ENGINE / "readiness.py").read_text())
    rules = {node.name for node in judge.body if isinstance(node, ast.FunctionDef)}
    assert {"judge", "of_training", "after_tuning", "verdict"} <= rules
    decided = []
    files = [*ENGINE.rglob("*.py"), *(config.ROOT / "api").rglob("*.py"), *(config.ROOT / "app_pages").glob("*.py")]
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


TESTS = config.ROOT / "tests"
# Calls that train a model or start a process (a server, a browser, a training) inside a fixture.
STARTS = {"train", "start_training", "Popen", "sync_playwright", "Postgres"}


def slow_fixtures_of_conftest() -> set[str]:
    """tests/conftest.py's SLOW_FIXTURES, read from its source (importing conftest again would make a new session
    home and point the environment at it)."""
    for node in ast.parse((TESTS / "conftest.py").read_text()).body:
        names = [target.id for target in getattr(node, "targets", ()) if isinstance(target, ast.Name)]
        if isinstance(node, ast.Assign) and names == ["SLOW_FIXTURES"]:
            return set(ast.literal_eval(node.value.args[0]))
    raise AssertionError("tests/conftest.py has no SLOW_FIXTURES")


def starts_something(function: ast.FunctionDef) -> bool:
    """Whether a function calls one of STARTS, or passes "train" first to a call (main(["train", ...]),
    place.engine("train", ...)) or within a command line ([..., "engine", "train", ...])."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            first = node.args[0] if node.args else None
            if isinstance(first, ast.List | ast.Tuple):
                first = first.elts[0] if first.elts else None
            if name in STARTS or (isinstance(first, ast.Constant) and first.value == "train"):
                return True
        if isinstance(node, ast.List | ast.Tuple):
            words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            if any(words[i : i + 2] == ["engine", "train"] for i in range(len(words))):
                return True
    return False


def is_fixture(function: ast.FunctionDef) -> bool:
    return any("fixture" in ast.unparse(decorator) for decorator in function.decorator_list)


def test_every_fixture_that_trains_or_starts_a_process_makes_its_tests_slow(request) -> None:
    """`./test.sh -m "not slow"` is the fast inner loop: conftest marks slow every test using a fixture of
    SLOW_FIXTURES, so a fixture that trains or starts a server or browser must be one, or use one."""
    slow = slow_fixtures_of_conftest()
    found, missing = set(), []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and is_fixture(node) and starts_something(node):
                found.add(node.name)
                uses = {a.arg for a in node.args.args}
                if node.name not in slow and not uses & slow:
                    missing.append(f"{path.name}:{node.lineno} {node.name}")
    assert {"trained_run", "postgres", "server", "browser", "finished"} <= found  # the walk sees them
    assert not missing, f"add to SLOW_FIXTURES in tests/conftest.py: {missing}"
    # And the hook marked them: no test collected here uses one without being slow.
    unmarked = [item.nodeid for item in request.session.items
                if slow & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow")]
    assert not unmarked, unmarked


def test_the_training_config_imports_no_torch() -> None:
    """A page or a command line builds a TrainConfig without loading torch (seconds on a small container)."""
    import subprocess
    import sys

    code = "import sys, engine.training.config; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=config.ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_train_page_imports_no_torch_before_a_run_starts() -> None:
    """The Train page renders its form (and the shared widgets module it imports) without loading torch."""
    import subprocess
    import sys

    code = ("import sys; from streamlit.testing.v1 import AppTest; "
            "at = AppTest.from_file('app_pages/2_Train.py', default_timeout=60).run(); "
            "assert not at.exception, [e.value for e in at.exception]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=config.ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_run_folders_file_names_are_spelled_in_one_module() -> None:
    """engine/runfolder.py names a run folder's files; elsewhere they are reached through RunFolder or its names."""
    names = {"run.json", "metrics.csv", "best.pth", "resume.pth", "recipe.json", "train.log", "train_config.json"}
    files = [*ENGINE.rglob("*.py"), *(config.ROOT / "api").rglob("*.py"), *(config.ROOT / "app_pages").glob("*.py")]
    spelled = [f"{path.relative_to(config.ROOT)}:{node.lineno}: {node.value}"
               for path in sorted(p for p in files if p.name != "runfolder.py")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and node.value in names]
    assert not spelled, spelled
