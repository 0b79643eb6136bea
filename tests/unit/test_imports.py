"""The import graph of dicom_node/ and train/: no cycle, no command importing another command,
and the node never importing the training package (read from the source, nothing imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_node", "train")


def _modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _on_import(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of ``body`` that run when the module is imported: not function or class
    bodies, not ``if TYPE_CHECKING:`` blocks."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _on_import(node.body)
            yield from _on_import(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _on_import(block)
            for handler in node.handlers:
                yield from _on_import(handler.body)
        elif isinstance(node, ast.With):
            yield from _on_import(node.body)


def _imports(name: str, module_level: bool) -> set[str]:
    """Project modules that module ``name`` imports, on import (``module_level``) or anywhere
    (``from x import y``: x.y when that is a module, else x)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = _on_import(tree.body) if module_level else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a non-module: a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _commands() -> set[str]:
    """train modules that are commands: they define ``main`` (``python -m train <command>``)."""
    commands = set()
    for name, path in MODULES.items():
        if not name.startswith("train.") or name == "train.__main__":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            commands.add(name)
    return commands


def _transports() -> set[str]:
    """dicom_node.send modules that are transports: they register a destination type when
    imported (``register(DestinationType(...))`` at module level, dicom_node/send/transport.py)."""
    found = set()
    for name, path in MODULES.items():
        if not name.startswith("dicom_node.send."):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _on_import(tree.body):
            value = (
                getattr(node, "value", None) if isinstance(node, ast.Expr | ast.Assign) else None
            )
            if isinstance(value, ast.Call):
                called = value.func
                if (isinstance(called, ast.Name) and called.id == "register") or (
                    isinstance(called, ast.Attribute) and called.attr == "register"
                ):
                    found.add(name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_sees_the_packages() -> None:
    commands = _commands()
    assert {"train.fit", "train.calibrate", "train.ensemble", "train.evaluate"} <= commands
    assert {"train.lr_find", "train.compare", "train.export"} <= commands
    assert "train.protocol" in _imports("train.fit", module_level=True)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    graph = {name: _imports(name, module_level=True) for name in MODULES}
    assert _cycle(graph) is None


def test_no_module_imports_a_train_command() -> None:
    """A module is a library or a command: helpers several commands use live in a library, so
    only the dispatcher (train/__main__.py) imports commands, anywhere in a module."""
    commands = _commands()
    offenders = {
        name: sorted(_imports(name, module_level=False) & commands)
        for name in MODULES
        if name != "train.__main__"
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_node_never_imports_train() -> None:
    offenders = {
        name: sorted(t for t in _imports(name, module_level=False) if t.split(".")[0] == "train")
        for name in MODULES
        if name.split(".")[0] == "dicom_node"
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_transports_never_import_one_another() -> None:
    """No module of dicom_node.send imports a transport module, anywhere in it, nor the package
    (which imports them all to register them): the transports share failures.py and
    transport.py, the sender finds them through the registry, so the scu ↔ stow cycle cannot
    come back."""
    transports = _transports()
    assert {"dicom_node.send.scu", "dicom_node.send.stow"} <= transports
    assert transports <= _imports("dicom_node.send", module_level=True)  # registered on import
    offenders = {
        name: sorted(_imports(name, module_level=False) & (transports | {"dicom_node.send"}))
        for name in MODULES
        if name.startswith("dicom_node.send.")
    }
    assert {name: found for name, found in offenders.items() if found} == {}
