"""The house rules of the layout (README "Layout"): imports run one way, each module has one job and a size a
reader can hold. Read from the source with ast: nothing is imported or run."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
MAX_LINES = 700
WRITERS = {"local_solution", "cloud_solution"}


def project_imports(name: str) -> set[str]:
    """The project modules `name` imports, anywhere in the file (also inside functions)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: project_imports(name) for name in MODULES}


def test_rpi_errors_imports_nothing_from_the_project():
    assert GRAPH["rpi_errors"] == set()


def test_nothing_imports_main_but_the_cli_entry():
    # The benchmark's child processes run the CLI itself (main.main), as a user would.
    assert [name for name, deps in GRAPH.items() if "main" in deps and not name.startswith("bench")] == []


def test_writers_never_import_each_other_main_or_the_delivery_policy():
    for writer in WRITERS | {"influx_http", "transport"}:
        assert not GRAPH[writer] & (WRITERS | {"main", "daemon", "service", "sender"}), writer


def test_the_daemon_side_imports_only_the_release_state_not_the_update_process():
    for name in ("main", "daemon", "service"):
        assert not GRAPH[name] & {"updater", "release_build"}, name
    assert not GRAPH["release"] & {"updater", "release_build", "config"}


def test_the_loop_knows_nothing_of_its_listeners():
    assert not GRAPH["daemon"] & {"service", "web", "view", "history", "sender", "main"}


def test_imports_have_no_cycles():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join(path + [name])
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            visit(dep, path + [name])
        state[name] = "done"

    for name in GRAPH:
        visit(name, [])


@pytest.mark.parametrize("name", [n for n in MODULES if n != "bench"])
def test_each_module_says_its_one_job_and_stays_readable(name):
    text = MODULES[name].read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.splitlines()[0].strip(), f"{name}.py: no docstring saying its job"
    assert len(text.splitlines()) <= MAX_LINES, f"{name}.py has {len(text.splitlines())} lines (at most {MAX_LINES})"
