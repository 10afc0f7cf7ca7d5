"""MkDocs hook: the reST cross-references of the docstrings.

The docstrings use Sphinx roles (``:func:`scale_by_adams```), which Markdown renders literally as
``:func:<code>scale_by_adams</code>``. Each becomes an optional mkdocs-autorefs reference to the
documented object (resolved after all pages are built; a name that is not documented stays plain
code). (``docs/griffe_rest.py`` handles the other reST markers, before rendering.)
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj):<code>~?([\w.]+)</code>")
PACKAGE = "lowrank_optax"


def _defined_objects(module: griffe.Module) -> Iterator[tuple[str, str]]:
    """(short name, qualified name) of every public function and class defined in the package."""
    for name, member in module.members.items():
        if member.is_alias or name.startswith("_"):
            continue
        if member.is_module:
            yield from _defined_objects(member)
        elif member.is_function or member.is_class:
            yield name, member.path


def _unique_names(package: griffe.Module) -> dict[str, str]:
    """Short name -> qualified name, for the short names defined exactly once."""
    found: dict[str, set[str]] = {}
    for name, path in _defined_objects(package):
        found.setdefault(name, set()).add(path)
    return {name: paths.pop() for name, paths in found.items() if len(paths) == 1}


_OBJECTS: dict[str, str] = {}


def on_config(config: Any, **kwargs: Any) -> Any:
    _OBJECTS.clear()
    root = pathlib.Path(config["config_file_path"]).parent
    _OBJECTS.update(_unique_names(griffe.load(PACKAGE, search_paths=[str(root)])))
    return config


def _reference(match: re.Match) -> str:
    name = match[1]
    identifier = name if name.startswith(f"{PACKAGE}.") else _OBJECTS.get(name, name)
    title = name.rsplit(".", 1)[-1] if name.startswith(f"{PACKAGE}.") else name
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(_reference, html)
