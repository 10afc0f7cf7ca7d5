"""MkDocs hooks: pages written in parallel, and the reST cross-references of the docstrings.

* Pages listed in ``PENDING_PAGES`` are written by other contributors and may not exist yet:
  missing ones are dropped from the nav, and Markdown links to them become their plain text
  (both logged), instead of failing ``mkdocs build --strict``. Every other nav entry and link
  must resolve.
* The docstrings use Sphinx roles (``:func:`scale_by_adams```), which Markdown renders literally
  as ``:func:<code>scale_by_adams</code>``. Each becomes an optional mkdocs-autorefs reference to
  the documented object (resolved after all pages are built; a name that is not documented stays
  plain code). (``docs/griffe_rest.py`` handles the other reST markers, before rendering.)
"""

from __future__ import annotations

import logging
import pathlib
import posixpath
import re
from collections.abc import Iterator
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj):<code>~?([\w.]+)</code>")
PACKAGE = "lowrank_optax"
PENDING_PAGES = {"gpt2_example.md", "multidevice.md", "benchmarks.md"}
LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s#]+\.md)(#[^)\s]*)?\)")
log = logging.getLogger("mkdocs.hooks")


def _missing_pending(target: str, docs_dir: pathlib.Path) -> bool:
    return target in PENDING_PAGES and not (docs_dir / target).exists()


def _existing_nav(entries: list[Any], docs_dir: pathlib.Path) -> list[Any]:
    """``entries`` without the pending pages that do not exist; sections left empty go too."""
    kept = []
    for entry in entries:
        title, target = next(iter(entry.items())) if isinstance(entry, dict) else (None, entry)
        if isinstance(target, list):
            target = _existing_nav(target, docs_dir)
            if not target:
                continue
        elif _missing_pending(target, docs_dir):
            log.info("nav: %s is not written yet; left out", target)
            continue
        kept.append({title: target} if title is not None else target)
    return kept


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


def unlink_missing_pages(markdown: str, page_path: str, docs_dir: pathlib.Path) -> str:
    """``markdown`` with each link to a pending page that does not exist replaced by its text."""
    base = posixpath.dirname(page_path)

    def unlink(match: re.Match) -> str:
        target = posixpath.normpath(posixpath.join(base, match[2]))
        if not _missing_pending(target, docs_dir):
            return match[0]
        log.info("%s: link to %s (not written yet) left as text", page_path, target)
        return match[1]

    return LINK.sub(unlink, markdown)


_OBJECTS: dict[str, str] = {}


def on_config(config: Any, **kwargs: Any) -> Any:
    config["nav"] = _existing_nav(config["nav"], pathlib.Path(config["docs_dir"]))
    _OBJECTS.clear()
    root = pathlib.Path(config["config_file_path"]).parent
    _OBJECTS.update(_unique_names(griffe.load(PACKAGE, search_paths=[str(root)])))
    return config


def _reference(match: re.Match) -> str:
    name = match[1]
    identifier = name if name.startswith(f"{PACKAGE}.") else _OBJECTS.get(name, name)
    title = name.rsplit(".", 1)[-1] if name.startswith(f"{PACKAGE}.") else name
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    return unlink_missing_pages(markdown, page.file.src_uri, pathlib.Path(config["docs_dir"]))


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(_reference, html)
