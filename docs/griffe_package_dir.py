"""A Griffe extension that finds ringlib's subpackages where setuptools' package-dir puts them.

pyproject.toml maps `ringlib.transport` to the folder `transport/` (likewise collectives,
runtime and bench). Griffe looks for submodules only inside `ringlib/`, so without this
the API pages could not load `ringlib.runtime.ring`. When Griffe has visited
`ringlib/__init__.py`, this visits every mapped folder's modules, statically, and hangs
them under `ringlib`. mkdocs.yml loads it (plugins: mkdocstrings: ... extensions).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ringlib"


def mapped_folders(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Path]:
    """{"transport": ROOT/"transport", ...}: the subpackages of ringlib that live elsewhere."""
    config = tomllib.loads(pyproject.read_text())
    package_dir = config["tool"]["setuptools"]["package-dir"]
    prefix = f"{PACKAGE}."
    return {name.removeprefix(prefix): ROOT / folder for name, folder in package_dir.items()
            if name.startswith(prefix) and "." not in name.removeprefix(prefix)}


class PackageDir(griffe.Extension):
    """Adds the package-dir subpackages to `ringlib` as soon as its __init__ is visited."""

    def on_module_members(self, *, node: ast.AST | griffe.ObjectNode, mod: griffe.Module,
                          agent: griffe.Visitor | griffe.Inspector, **kwargs: Any) -> None:
        if mod.path != PACKAGE or not isinstance(agent, griffe.Visitor):
            return
        for name, folder in mapped_folders().items():
            package = _visit(name, folder / "__init__.py", mod, agent)
            for path in sorted(folder.glob("*.py")):
                if path.name != "__init__.py":
                    _visit(path.stem, path, package, agent)


def _visit(name: str, path: Path, parent: griffe.Module, agent: griffe.Visitor) -> griffe.Module:
    code = path.read_text(encoding="utf-8-sig")
    agent.lines_collection[path] = code.splitlines(keepends=False)
    module = griffe.visit(name, filepath=path, code=code, parent=parent,
                          extensions=agent.extensions, docstring_parser=agent.docstring_parser,
                          docstring_options=agent.docstring_options,
                          lines_collection=agent.lines_collection,
                          modules_collection=agent.modules_collection)
    parent.set_member(name, module)
    return module
