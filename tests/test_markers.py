"""Every test that starts a process is marked ``e2e``, so the fast command
(``pytest -q -m "not slow and not e2e"``) runs in-process tests only and a new
end-to-end test cannot slip into it unmarked.

Read from the source: a test starts a process when it reaches, through the
module's own functions, classes and fixtures (its arguments, ``usefixtures``,
autouse ones, ``conftest.py``'s) and the shared test helpers (``runs``,
``processes``), ``subprocess``, ``multiprocessing``, ``ray``, a fork or spawn
of ``os``, a fedlora child's command (``runs.FEDLORA``), or the helpers that
find and stop a test's processes (``processes.ours``, ``processes.stop``).
What the source cannot show is marked by hand: a Ray that ``fedlora
simulate`` starts in this process (``tests/core/test_config.py``'s CLI
checks), a child that ``fedlora compare`` starts
(``tests/commands/test_compare_interrupt.py``)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROCESS_MODULES = {"subprocess", "multiprocessing", "ray"}
OS_STARTERS = {"fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp"}
# helpers that start nothing themselves but go with a test's own processes
PROCESS_HELPERS = {("processes", "ours"), ("processes", "stop"), ("runs", "FEDLORA")}
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _usefixtures(decorators: list[ast.expr]) -> set[str]:
    return {arg.value for d in decorators if isinstance(d, ast.Call)
            and isinstance(d.func, ast.Attribute) and d.func.attr == "usefixtures"
            for arg in d.args if isinstance(arg, ast.Constant)}


def _marks_e2e(node: ast.AST | None) -> bool:
    """``pytest.mark.e2e`` (called or not) anywhere in ``node``."""
    return node is not None and any(
        isinstance(n, ast.Attribute) and n.attr == "e2e" and isinstance(n.value, ast.Attribute)
        and n.value.attr == "mark" for n in ast.walk(node))


def _is_autouse(node: ast.AST) -> bool:
    return any(isinstance(d, ast.Call) and any(k.arg == "autouse" and getattr(
        k.value, "value", False) is True for k in d.keywords) for d in node.decorator_list)


class Module:
    """One file's top-level definitions, imports (function-level ones
    included) and module-level ``pytestmark``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        tree = ast.parse(path.read_text())
        self.defs = {n.name: n for n in tree.body if isinstance(n, DEFS)}
        self.names = set(self.defs) | {t.id for n in tree.body if isinstance(n, ast.Assign)
                                       for t in n.targets if isinstance(t, ast.Name)}
        self.imports: dict[str, tuple[str, str | None]] = {}  # local name → (module, name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.imports[alias.asname or alias.name.split(".")[0]] = (alias.name, None)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module, alias.name)
        self.pytestmark = next((n.value for n in tree.body if isinstance(n, ast.Assign) and any(
            getattr(t, "id", None) == "pytestmark" for t in n.targets)), None)
        self.everywhere = {name for name, node in self.defs.items()
                           if not isinstance(node, ast.ClassDef) and _is_autouse(node)}
        if self.pytestmark is not None:
            self.everywhere |= _usefixtures(list(ast.walk(self.pytestmark)))

    @cache
    def refs(self, name: str) -> set[str]:
        """The names a definition uses: bare, ``module.attr``, its arguments
        (fixtures), ``usefixtures`` strings; a test also its module's autouse
        and ``pytestmark`` fixtures."""
        node = self.defs[name]
        found = set(self.everywhere) if name.startswith("test") else set()
        for n in ast.walk(node):
            if isinstance(n, ast.Name):
                found.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                found.add(f"{n.value.id}.{n.attr}")
            elif isinstance(n, ast.arg):
                found.add(n.arg)
        if not isinstance(node, ast.ClassDef):
            found |= _usefixtures(node.decorator_list)
        return found - {name}

    def tests(self) -> dict[str, bool]:
        """Test name → marked e2e (by the module's ``pytestmark`` or its own)."""
        return {name: _marks_e2e(self.pytestmark) or any(map(_marks_e2e, node.decorator_list))
                for name, node in self.defs.items()
                if name.startswith("test") and not isinstance(node, ast.ClassDef)}


class Finder:
    """Which tests start a process, and through what (the helpers and the
    shared fixtures are ``tests/*.py``)."""

    def __init__(self) -> None:
        self._modules: dict[Path, Module] = {}

    def module(self, path: Path) -> Module:
        if path not in self._modules:
            self._modules[path] = Module(path)
        return self._modules[path]

    @cache
    def _helper(self, name: str) -> Module | None:
        path = TESTS / f"{name}.py"
        return self.module(path) if path.is_file() else None

    def chain(self, module: Module, name: str, seen: set | None = None,
              helpers: bool = True) -> list[str]:
        """How ``name`` in ``module`` reaches a process start (empty: it does
        not); ``helpers=False``: through a start itself, not ``ours``/``stop``."""
        seen = set() if seen is None else seen
        if (module.path, name) in seen:
            return []
        seen.add((module.path, name))
        head, _, attr = name.partition(".")
        if name in module.defs:
            for ref in sorted(module.refs(name)):
                if found := self.chain(module, ref, seen, helpers):
                    return [name, *found]
            return []
        if head not in module.imports:
            conftest = self._helper("conftest")
            if not attr and conftest and conftest is not module and name in conftest.defs:
                return self.chain(conftest, name, seen, helpers)  # a shared fixture
            return []
        source, imported = module.imports[head]
        if source.split(".")[0] in PROCESS_MODULES:
            return [name]
        target = imported if imported is not None else attr  # from runs import x / runs.x
        if source == "os" and target in OS_STARTERS:
            return [name]
        if helpers and (source, target) in PROCESS_HELPERS:
            return [f"{source}.{target}"]
        helper = self._helper(source) if target else None
        if helper is not None and target in helper.defs:
            found = self.chain(helper, target, seen, helpers)
            return [f"{source}.{found[0]}", *found[1:]] if found else []
        return []

    def unmarked(self, path: Path) -> list[str]:
        """``path::test (via a > b > c)`` for each test that starts a process
        and is not marked e2e."""
        module = self.module(path)
        where = path.relative_to(TESTS) if path.is_relative_to(TESTS) else path.name
        return [f"{where}::{test} (via {' > '.join(found[1:])})"
                for test, e2e in module.tests().items()
                if not e2e and (found := self.chain(module, test, helpers=False)
                                or self.chain(module, test))]


def test_every_test_that_starts_a_process_is_marked_e2e():
    finder = Finder()
    unmarked = [line for path in sorted(TESTS.rglob("test_*.py")) for line in finder.unmarked(path)]
    assert not unmarked, ("start processes but are not marked @pytest.mark.e2e (module-wide: "
                          "pytestmark = pytest.mark.e2e):\n" + "\n".join(unmarked))


def test_the_repository_has_process_tests_and_the_check_sees_them():
    """The check would pass vacuously if the helpers it follows were renamed
    or the marks stopped being read: it must find the simulations it knows."""
    finder = Finder()
    for source, name in PROCESS_HELPERS:
        assert name in finder._helper(source).names, f"{source}.{name} is gone: update the check"
    simulation = finder.module(TESTS / "commands" / "test_simulation.py")
    assert simulation.tests() and all(simulation.tests().values())
    assert all(finder.chain(simulation, test) for test in simulation.tests())


SAMPLE = '''
import subprocess
import pytest
from runs import check_run

class Child:
    def start(self):
        self.process = subprocess.Popen(["sleep", "9"])

@pytest.fixture
def child():
    node = Child()
    node.start()
    yield node

def _helper(path):
    return check_run(path)

{mark}
def test_through_a_fixture(child):
    pass

{mark}
def test_through_a_helper(tmp_path):
    _helper(tmp_path)

@pytest.mark.usefixtures("child")
{mark}
def test_through_usefixtures():
    pass

def test_in_process_only():
    assert 1 + 1 == 2
'''


def test_the_check_finds_what_starts_a_process_and_takes_the_marks(tmp_path):
    path = tmp_path / "test_sample.py"
    path.write_text(SAMPLE.format(mark=""))
    fixture, helper, usefixtures = Finder().unmarked(path)
    assert fixture == "test_sample.py::test_through_a_fixture (via child > Child > subprocess)"
    assert helper.startswith("test_sample.py::test_through_a_helper (via _helper > "
                             "runs.check_run > ") and helper.endswith(" > subprocess)")
    assert usefixtures == ("test_sample.py::test_through_usefixtures "
                           "(via child > Child > subprocess)")
    path.write_text(SAMPLE.format(mark="@pytest.mark.e2e"))
    assert Finder().unmarked(path) == []
    path.write_text("pytestmark = [pytest.mark.e2e]\n" + SAMPLE.format(mark=""))
    assert Finder().unmarked(path) == []
