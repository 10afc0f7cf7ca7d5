"""Griffe extension: read the reST markers of the docstrings as Google-style Markdown.

* ``Example::`` / ``Examples::`` (a reST literal-block header) becomes the Google ``Examples:``
  section, so its ``>>>`` lines render as a Python console block, not as nested quotes;
* any other ``::`` ending a line becomes ``:`` (the indented block after it is already a
  Markdown code block).

Cross-reference roles (``:func:`x```) are handled after rendering by ``docs/hooks.py``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLES_HEADER = re.compile(r"^(\s*)Examples?::\s*$", re.MULTILINE)
LITERAL_MARKER = re.compile(r"(?<=\S)::\s*$", re.MULTILINE)


def markdown_docstring(text: str) -> str:
    text = EXAMPLES_HEADER.sub(r"\1Examples:", text)
    return LITERAL_MARKER.sub(":", text)


class ReSTMarkers(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
