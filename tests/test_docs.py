"""The documentation runs: code blocks of the guides, docstring examples, and the site build.

* every ```` ```python ```` block of the executed pages runs, each in a fresh namespace (a reader
  copies one block at a time), and carries its own ``assert``s;
* ``doctest`` runs the ``>>>`` examples of every ``lowrank_optax`` module;
* the API index lists every name the package exports;
* ``mkdocs build --strict`` (warnings are errors) passes, when mkdocs is installed.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys

import pytest

import lowrank_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXECUTED_PAGES = [
    "docs/index.md",
    "docs/getting_started.md",
    "docs/guide.md",
    "docs/conventions.md",
    "docs/tunix.md",
    "docs/methods/riemannian.md",
    "docs/methods/lora_s.md",
    "docs/methods/altlora.md",
    "docs/methods/lora_pro.md",
    "docs/methods/lora_rite.md",
    "docs/methods/solora.md",
]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(page: str) -> list[str]:
    return PYTHON_BLOCK.findall((ROOT / page).read_text())


def library_modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(lowrank_optax.__path__, "lowrank_optax.")
    )


@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_code_blocks_run(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    for number, block in enumerate(blocks):
        namespace = {"__name__": f"docs_block_{number}"}
        code = compile(block, f"{page}[block {number}]", "exec")
        exec(code, namespace)  # noqa: S102


def test_page_blocks_assert_something():
    for page in EXECUTED_PAGES:
        for number, block in enumerate(python_blocks(page)):
            assert "assert " in block, f"{page} block {number} checks nothing"


def test_block_extraction_sees_failures():
    """A failing block must fail the test: the extraction is not vacuous."""
    with pytest.raises(AssertionError):
        exec(compile("assert 1 + 1 == 3", "<block>", "exec"), {})  # noqa: S102
    text = "x\n```python\nassert False\n```\n```bash\nls\n```\n"
    assert PYTHON_BLOCK.findall(text) == ["assert False\n"]


@pytest.mark.parametrize("package", ["lowrank_optax", "lowrank_optax.flax"])
def test_api_index_lists_every_export(package):
    if package != "lowrank_optax":
        pytest.importorskip("flax")
    exports = importlib.import_module(package).__all__
    index = (ROOT / "docs" / "api" / "index.md").read_text()
    missing = [name for name in exports if f"`{name}`" not in index]
    assert not missing, f"docs/api/index.md does not list {missing} of {package}"


@pytest.mark.parametrize("module_name", library_modules())
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    for test in finder.find(module, module_name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed in {module_name}"


def yaml_nav_targets() -> set[str]:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def targets(entries):
        for entry in entries:
            target = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from targets(target) if isinstance(target, list) else [target]

    return set(targets(config["nav"]))


def test_every_page_is_in_the_nav():
    config = yaml_nav_targets()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages <= config, sorted(pages - config)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    mkdocs = shutil.which("mkdocs")
    command = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    result = subprocess.run(
        [*command, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    api_pages = sorted((tmp_path / "site" / "api").glob("*/index.html"))
    assert len(api_pages) >= 8
    for page in api_pages:
        html = page.read_text()
        assert not re.search(r":(func|class|mod|meth):", html), f"raw reST role in {page}"
        assert "<blockquote>" not in html, f"docstring example rendered as quotes in {page}"
    riemannian = (tmp_path / "site" / "api" / "riemannian" / "index.html").read_text()
    assert 'id="lowrank_optax.riemannian.scaled_adamw"' in riemannian
    assert 'href="#lowrank_optax.riemannian.scale_by_riemannian_precond"' in riemannian
