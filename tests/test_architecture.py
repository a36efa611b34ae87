"""Static checks of the library's structure (house rules 1, 13, 14 and 16), with :mod:`ast`.

- the import graph of the library's own modules has no cycle, and nothing but ``__main__`` imports
  the CLI;
- only ``_transport.py`` touches private names of other objects, ``http.client``, or urllib3's and
  http.client's internals (``poolmanager``, ``_fp``, ``_connection``, ``_sock``);
- ``Session`` and the functions of the core modules stay small.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, Optional, Union

import pytest

import aichatonline_sync

PACKAGE = "aichatonline_sync"
PACKAGE_DIR = Path(aichatonline_sync.__file__).parent


def dotted(path: Path) -> str:
    """``_client/session.py`` -> ``"_client.session"``; ``gateway/__init__.py`` -> ``"gateway"``;
    the package's own ``__init__.py`` -> ``"__init__"``."""
    parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


#: The library's modules by dotted name below the package (``"__init__"`` is the package itself).
MODULES: dict[str, Path] = {dotted(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}
#: The one folder allowed to touch internals (house rule 14).
TRANSPORT = "_transport.transport"
CORE_MODULES = (
    "_client.session",
    "_client.stream",
    "_transport.transport",
    "_client.retry",
    "_client.config",
    "_client.registry",
    "_client.token",
    "_transport.cancel",
    "_wire.parser",
    "_wire.framing",
    "_wire.protocol",
    "_client.batch",
)
#: The layers, lowest first. A module imports (when it runs) only from its own layer and below;
#: ``__init__`` (the public API) sits above the features and below the front ends.
LAYERS = {
    "_version": 0,
    "_wire": 0,
    "_transport": 1,
    "_client": 2,
    "_features": 3,
    "__init__": 4,
    "cli": 5,
    "gateway": 5,
    "integrations": 5,
    "testing": 5,
    "__main__": 6,
}
FRONT_ENDS = ("cli", "gateway", "integrations", "testing")
#: The client modules front ends may use besides the public names, each for a reason.
FRONT_END_DOORS = {
    "_client.config": "the option validators every front end applies to its flags and settings",
    "_client.env": "the AICHATONLINE_* settings that the CLI, the gateway and the llm plugin read",
    "_client.usage": "the tokenizer the gateway enforces max_tokens with",
}
MAX_SESSION_LINES = 260
MAX_FUNCTION_LINES = 65

#: Attributes that start with one underscore but are public API of the standard library.
STDLIB_PRIVATE_ALLOWED = frozenset(
    {
        "_exit",  # os._exit
        "_getframe",  # sys._getframe
        "_asdict",  # namedtuple / NamedTuple methods and attributes
        "_replace",
        "_fields",
        "_field_defaults",
        "_make",
    }
)
#: Names of the internals of urllib3 / http.client / the socket layer.
INTERNAL_NAMES = frozenset({"poolmanager", "_fp", "_connection", "_sock"})

FunctionNode = Union[ast.FunctionDef, ast.AsyncFunctionDef]


@functools.cache
def parse(name: str) -> ast.Module:
    path = MODULES[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(name: str, node: Union[ast.AST, Import]) -> str:
    line = node.line if isinstance(node, Import) else getattr(node, "lineno", "?")
    return f"{MODULES[name].relative_to(PACKAGE_DIR.parent)}:{line}"


def layer_of(name: str) -> str:
    """The folder (layer or front end) of a module: ``"_client.session"`` -> ``"_client"``."""
    return name.split(".", maxsplit=1)[0]


def is_private(attr: str) -> bool:
    """One leading underscore: ``_name``, not ``__dunder__`` (nor a bare ``_``)."""
    return attr.startswith("_") and not attr.startswith("__") and len(attr) > 1


def is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


# -- imports ------------------------------------------------------------------------------------


class Import(NamedTuple):
    target: str  #: the library module imported ("__init__" for the package itself)
    line: int
    type_checking: bool  #: inside ``if TYPE_CHECKING:`` (never run)
    top_level: bool  #: at module level (run at import time), not inside a function


class ImportCollector(ast.NodeVisitor):
    """Every import of a library module, as the dotted name of the module imported:
    ``from . import x``, ``from .x import y``, ``from ..x import y``, ``import aichatonline_sync.x``,
    ``from aichatonline_sync.x import y``; at module level and inside functions. Strings (such as
    ``__init__``'s ``_LAZY`` mapping) are not imports. ``here`` is the importing module's package
    (``""`` for the package's top level)."""

    def __init__(self, here: str = "") -> None:
        self.imports: list[Import] = []
        self.here = here
        self._type_checking = 0
        self._depth = 0

    def _add(self, target: str, node: ast.stmt) -> None:
        self.imports.append(Import(target, node.lineno, self._type_checking > 0, self._depth == 0))

    @staticmethod
    def _module(package: str, name: str) -> str:
        """``from <package> import name``: the module ``package.name`` if there is one, else the
        package itself."""
        joined = f"{package}.{name}" if package else name
        if joined in MODULES or not MODULES:
            return joined
        return package or "__init__"

    def visit_If(self, node: ast.If) -> None:
        if not is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._type_checking += 1
        for child in node.body:
            self.visit(child)
        self._type_checking -= 1
        for child in node.orelse:
            self.visit(child)

    def _visit_scope(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_scope(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_scope(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_scope(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE:
                self._add(".".join(parts[1:]) or "__init__", node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0:
            if module.split(".")[0] != PACKAGE:
                return  # another package
            package = module[len(PACKAGE) + 1 :]  # "aichatonline_sync._wire" -> "_wire"
        else:
            base = self.here.split(".") if self.here else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            package = ".".join([*base, *([module] if module else [])])
        for alias in node.names:
            self._add(self._module(package, alias.name), node)


@functools.cache
def imports_of(name: str) -> tuple[Import, ...]:
    is_package = MODULES[name].name == "__init__.py"
    here = "" if name == "__init__" else name if is_package else name.rpartition(".")[0]
    collector = ImportCollector(here)
    collector.visit(parse(name))
    return tuple(collector.imports)


def import_graph() -> dict[str, set[str]]:
    """Which library module imports which, when it runs (``TYPE_CHECKING`` imports left out).

    ``__init__`` is no source of edges: its eager imports only re-export, and the modules it
    loads lazily (its ``_LAZY`` mapping) are strings, not imports.
    """
    return {
        name: {item.target for item in imports_of(name) if not item.type_checking}
        for name in MODULES
        if name != "__init__"
    }


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or ``None``."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> Optional[list[str]]:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_collector_sees_every_kind_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import stream\n"
        "from .token import thing\n"
        "from .._wire import errors\n"
        "from .._wire.parser import LineParser\n"
        "from .. import _version\n"
        "import aichatonline_sync._transport.cancel\n"
        "from aichatonline_sync import Session\n"
        "if TYPE_CHECKING:\n"
        "    from .config import Hint\n"
        "def f():\n"
        "    from .batch import late\n"
        "LAZY = {'X': '._f'}\n"
    )
    collector = ImportCollector("_client")
    collector.visit(ast.parse(source))
    found = {(item.target, item.type_checking, item.top_level) for item in collector.imports}
    assert found == {
        ("_client.stream", False, True),
        ("_client.token", False, True),
        ("_wire.errors", False, True),
        ("_wire.parser", False, True),
        ("_version", False, True),
        ("_transport.cancel", False, True),
        ("__init__", False, True),
        ("_client.config", True, True),
        ("_client.batch", False, False),
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_of_the_library_has_no_cycle() -> None:
    graph = import_graph()
    assert graph["_client.session"], "the collector found no import at all"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_modules_loaded_by_the_package_do_not_import_it_back_at_import_time() -> None:
    """``__init__``'s eager imports, followed through every module-level import, never come
    back to the package itself (that would be a cycle at ``import aichatonline_sync``)."""
    eager = {
        name: {
            item.target for item in imports_of(name) if item.top_level and not item.type_checking
        }
        for name in MODULES
    }
    cycle = find_cycle(eager)
    assert cycle is None, "import-time cycle through the package: " + " -> ".join(cycle or [])


def test_every_module_is_in_a_layer() -> None:
    assert sorted({layer_of(name) for name in MODULES}) == sorted(LAYERS)


def test_imports_point_down_the_layers() -> None:
    """No module imports (when it runs) from a layer above its own; hints may look up."""
    upward = [
        f"{where(name, item)} {name} -> {item.target}"
        for name in MODULES
        for item in imports_of(name)
        if not item.type_checking and LAYERS[layer_of(item.target)] > LAYERS[layer_of(name)]
    ]
    assert upward == [], "imports that point up the layers:\n" + "\n".join(upward)


def test_front_ends_use_the_public_api() -> None:
    """A front end imports the package's public names, the wire vocabulary (the emulator speaks
    the upstream's protocol), its own folder and other front ends; never the client or the
    transport's modules."""
    allowed = {"__init__", "_version", "_wire", *FRONT_ENDS}
    reached = [
        f"{where(name, item)} {name} -> {item.target}"
        for name in MODULES
        if layer_of(name) in FRONT_ENDS
        for item in imports_of(name)
        if layer_of(item.target) not in allowed and item.target not in FRONT_END_DOORS
    ]
    assert reached == [], "front ends reaching below the public API:\n" + "\n".join(reached)


def test_only_main_imports_the_cli() -> None:
    offenders = [
        where(name, item)
        for name in MODULES
        if name != "__main__" and layer_of(name) != "cli"
        for item in imports_of(name)
        if layer_of(item.target) == "cli"
    ]
    assert offenders == [], "the library imports its CLI: " + ", ".join(offenders)
    assert any(item.target == "cli" for item in imports_of("__main__"))


# -- private names and internals ----------------------------------------------------------------


def defined_private_names(tree: ast.Module) -> set[str]:
    """Every ``_name`` a file defines: functions, classes, attributes assigned on any object
    (``self._x = ...``), names assigned at module level or in a class body (class attributes,
    dataclass fields), and ``__slots__`` entries. Function locals and parameters do not count."""
    names: set[str] = set()
    scopes: list[list[ast.stmt]] = [tree.body]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            scopes.append(node.body)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    for body in scopes:
        for statement in body:
            targets: list[ast.expr] = []
            if isinstance(statement, ast.Assign):
                targets = list(statement.targets)
            elif isinstance(statement, ast.AnnAssign):
                targets = [statement.target]
            for target in targets:
                names.update(
                    item.id
                    for item in ast.walk(target)
                    if isinstance(item, ast.Name) and isinstance(item.ctx, ast.Store)
                )
            if isinstance(statement, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "__slots__"
                for target in statement.targets
            ):
                names.update(
                    item.value
                    for item in ast.walk(statement.value)
                    if isinstance(item, ast.Constant) and isinstance(item.value, str)
                )
    return {name for name in names if is_private(name)}


def library_module_names(tree: ast.Module) -> set[str]:
    """The local names bound to the library's own modules (``import aichatonline_sync``,
    ``from . import _x``, ``import aichatonline_sync._x as x``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    names.add(alias.asname or PACKAGE)
        elif isinstance(node, ast.ImportFrom) and (
            (node.level > 0 and not node.module) or (node.level == 0 and node.module == PACKAGE)
        ):
            names.update(
                alias.asname or alias.name for alias in node.names if alias.name in MODULES
            )
    return names


def owner_is_allowed(value: ast.expr, modules: set[str]) -> bool:
    """``self``/``cls`` or one of the library's modules (``aichatonline_sync._client.session``, too)."""
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls") or value.id in modules
    return (
        isinstance(value, ast.Attribute)
        and value.attr in MODULES
        and owner_is_allowed(value.value, modules)
    )


def private_accesses(name: str) -> Iterator[str]:
    """``obj._x`` (and ``getattr(obj, "_x")``) on an object of someone else, as ``file:line``."""
    tree = parse(name)
    own = defined_private_names(tree)
    modules = library_module_names(tree)
    for node in ast.walk(tree):
        attr: Optional[str] = None
        owner: Optional[ast.expr] = None
        if isinstance(node, ast.Attribute):
            attr, owner = node.attr, node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            attr, owner = node.args[1].value, node.args[0]
        if attr is None or owner is None or not is_private(attr):
            continue
        if attr in own or attr in STDLIB_PRIVATE_ALLOWED or owner_is_allowed(owner, modules):
            continue
        yield f"{where(name, node)} .{attr}"


def test_the_private_access_scanner_finds_what_it_should() -> None:
    tree = ast.parse(
        "class _A:\n"
        "    __slots__ = ('_slot',)\n"
        "    _kept = 1\n"
        "    def _f(self, _arg):\n"
        "        _local = 2\n"
        "        self._mine = _arg._theirs\n"
    )
    assert defined_private_names(tree) == {"_A", "_slot", "_kept", "_f", "_mine"}
    assert "_fp" not in defined_private_names(parse(TRANSPORT))  # read there, never defined
    assert any(item.endswith("._fp") for item in private_accesses(TRANSPORT))


def test_no_module_but_the_transport_reaches_into_private_names() -> None:
    offenders = [item for name in MODULES if name != TRANSPORT for item in private_accesses(name)]
    assert offenders == [], "private names of other objects used outside _transport.py:\n" + (
        "\n".join(offenders)
    )


def internal_uses(name: str) -> Iterator[str]:
    """Imports of ``http.client`` and uses of the names of urllib3/http.client internals."""
    for node in ast.walk(parse(name)):
        found: Optional[str] = None
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[:2] == ["http", "client"] for alias in node.names):
                found = "import http.client"
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if module.split(".")[:2] == ["http", "client"] or (
                module == "http" and any(alias.name == "client" for alias in node.names)
            ):
                found = f"from {module} import ..."
        elif isinstance(node, ast.Attribute):
            if node.attr in INTERNAL_NAMES:
                found = f".{node.attr}"
            elif (
                node.attr == "client"
                and isinstance(node.value, ast.Name)
                and node.value.id == "http"
            ):
                found = "http.client"
        elif isinstance(node, ast.Name) and node.id in INTERNAL_NAMES:
            found = node.id
        elif isinstance(node, ast.Constant) and node.value in INTERNAL_NAMES:
            found = repr(node.value)
        elif isinstance(node, ast.keyword) and node.arg in INTERNAL_NAMES:
            found = f"{node.arg}="
        if found is not None:
            yield f"{where(name, node)} {found}"


def test_only_the_transport_imports_http_client_or_names_internals() -> None:
    assert list(internal_uses(TRANSPORT)), "the scanner found nothing in _transport.py"
    offenders = [item for name in MODULES if name != TRANSPORT for item in internal_uses(name)]
    assert offenders == [], "internals used outside _transport.py:\n" + "\n".join(offenders)


# -- size ---------------------------------------------------------------------------------------


def span(node: ast.stmt) -> int:
    """Lines from the ``def``/``class`` line to the last line, docstring included."""
    end = node.end_lineno
    assert end is not None
    return end - node.lineno + 1


def test_session_class_is_small() -> None:
    classes = [
        node
        for node in parse("_client.session").body
        if isinstance(node, ast.ClassDef) and node.name == "Session"
    ]
    assert len(classes) == 1
    lines = span(classes[0])
    assert lines < MAX_SESSION_LINES, (
        f"Session is {lines} lines (limit {MAX_SESSION_LINES})"
    )


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_functions_are_short(module: str) -> None:
    assert module in MODULES, f"core module {module} is missing"
    functions: list[FunctionNode] = [
        node
        for node in ast.walk(parse(module))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    long = [
        f"{where(module, node)} {node.name}() is {span(node)} lines"
        for node in functions
        if span(node) > MAX_FUNCTION_LINES
    ]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_every_logger_of_the_package_is_made_by_the_redaction_module() -> None:
    """A module logs only through ``_redact.logger(...)``, which puts the redacting filter on it."""
    found = [
        where(name, node)
        for name in MODULES
        if name != "_wire.redact"
        for node in ast.walk(parse(name))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "getLogger"
        and node.args  # (getLogger() with no name is the root logger, which the CLI configures)
    ]
    assert found == [], "loggers made without the redacting filter:\n" + "\n".join(found)


def test_every_warning_of_the_library_goes_through_the_redaction_module() -> None:
    """``warnings.warn`` only in ``_redact.warn``, which masks the text and finds the caller's line."""
    found = [
        where(name, node)
        for name in MODULES
        if name != "_wire.redact"
        for node in ast.walk(parse(name))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "warn"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "warnings"
    ]
    assert found == [], "warnings issued around the redaction point:\n" + "\n".join(found)
