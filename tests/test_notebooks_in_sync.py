"""The notebooks' jupytext sources (``notebooks/NN_*.py``) and the committed ``.ipynb`` agree.

The ``.py`` (jupytext percent format) is what people edit; the ``.ipynb`` next to it is generated
from it, committed without outputs, and is what nbmake runs. These tests read both (nothing is
executed) and fail when one was edited and the other not, naming the command that fixes it.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
FORMATS = "ipynb,py:percent"


def rel(path: Path) -> str:
    return path.relative_to(NOTEBOOKS.parent).as_posix()


def regenerate(source: Path) -> str:
    """The command that rewrites the .ipynb from its .py (keeping cell ids), whatever the timestamps."""
    return f"jupytext --update --to ipynb {rel(source)}"


def cells(nb) -> list[tuple[str, str, list]]:
    """What must agree: each cell's type, source and tags (nbmake reads tags such as skip-execution)."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def as_lines(nb_cells: list[tuple[str, str, list]]) -> list[str]:
    """The cells as text, one marker line per cell, for a readable diff."""
    lines = []
    for cell_type, source, tags in nb_cells:
        lines.append(f"# ---- {cell_type} cell" + (f" tags={tags}" if tags else ""))
        lines += source.splitlines()
    return lines


def test_every_notebook_has_a_source():
    ipynbs = {p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}
    sources = {p.stem for p in SOURCES}
    assert sources, f"no notebooks/NN_*.py found in {NOTEBOOKS}"
    assert ipynbs == sources, (
        f".ipynb without a .py: {sorted(ipynbs - sources)}; .py without an .ipynb: {sorted(sources - ipynbs)}. "
        "Each notebook is a jupytext .py (the source) plus the .ipynb made from it: "
        "`jupytext --to ipynb notebooks/NN_name.py` makes a missing .ipynb."
    )


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_matches_its_py(source: Path):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"{rel(ipynb)} is missing: run `jupytext --to ipynb {rel(source)}`"
    text_nb = jupytext.read(source)
    committed = nbformat.read(ipynb, as_version=4)
    nbformat.validate(committed)

    fix = (
        f"The .py is the source: make the change there (move an edit made in the .ipynb into the .py), "
        f"never in the .ipynb by hand, then run `{regenerate(source)}`."
    )
    assert text_nb.metadata.get("jupytext", {}).get("formats") == FORMATS, (
        f"{rel(source)}: its jupytext header must pair it with the notebook (formats: {FORMATS})"
    )
    assert committed.metadata.get("jupytext", {}).get("formats") == FORMATS, (
        f"{rel(ipynb)} is not paired with its .py (metadata jupytext.formats != {FORMATS!r}). {fix}"
    )

    want, have = cells(text_nb), cells(committed)
    if want == have:
        return
    if len(want) != len(have):
        where = f"{len(want)} cells in the .py, {len(have)} in the .ipynb"
    else:
        where = f"cell {next(i for i, (w, h) in enumerate(zip(want, have, strict=True)) if w != h)} (0-based) differs"
    diff = "\n".join(
        difflib.unified_diff(as_lines(have), as_lines(want), fromfile=rel(ipynb), tofile=rel(source), lineterm="", n=2)
    )
    pytest.fail(f"{rel(source)} and {rel(ipynb)} have drifted apart ({where}). {fix}\n{diff}", pytrace=False)


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_ipynb_has_no_outputs(source: Path):
    ipynb = source.with_suffix(".ipynb")
    committed = nbformat.read(ipynb, as_version=4)
    dirty = [
        i
        for i, c in enumerate(committed.cells)
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{rel(ipynb)} carries outputs or execution counts in cells {dirty}; committed notebooks have none. "
        f"Run `jupytext --to ipynb {rel(source)}` (rewrites it from the .py without outputs)."
    )
