"""Sync the tutorial notebooks in notebooks/ with their py:percent text files, or check that they are in sync.

Each notebook notebooks/0N_name.ipynb is paired (jupytext.toml) with notebooks/0N_name.py, a text file in
jupytext's py:percent format that holds the same cells and tags. Edit either one: JupyterLab with the jupytext
extension saves both, and after an edit elsewhere (a text editor, a merge) this script brings the other up to date:

    .venv/bin/python scripts/sync_notebooks.py            # jupytext --sync each pair (newer file wins), clear outputs
    .venv/bin/python scripts/sync_notebooks.py --check    # exit 1 naming each notebook out of sync or with outputs

The .ipynb files are committed without outputs and with exactly one cell tagged ``parameters`` (papermill's).
Syncing clears outputs and execution counts from the .ipynb files; ``--check`` changes nothing.
"""

from __future__ import annotations

import argparse
import difflib
import os
import subprocess
import sys
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
TEXT_FORMAT = "py:percent"
FIX = "python scripts/sync_notebooks.py"


def _pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Every notebook name in ``folder`` (from an .ipynb or a .py file) -> (its .ipynb, its .py)."""
    stems = {p.stem for p in folder.glob("*.ipynb")} | {p.stem for p in folder.glob("*.py")}
    return {stem: (folder / f"{stem}.ipynb", folder / f"{stem}.py") for stem in sorted(stems)}


def _dirty_cells(nb) -> list[int]:
    return [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))
    ]


def _as_text(nb) -> list[str]:
    import jupytext

    return jupytext.writes(nb, fmt=TEXT_FORMAT).splitlines(keepends=True)


def problems(ipynb: Path, text: Path) -> list[str]:
    """What is wrong with one pair: a missing file, outputs, not one ``parameters`` cell, or different cells."""
    import jupytext
    import nbformat

    missing = [p.name for p in (ipynb, text) if not p.exists()]
    if missing:
        return [f"{', '.join(missing)} is missing"]
    nb = nbformat.read(ipynb, as_version=4)
    found = []
    dirty = _dirty_cells(nb)
    if dirty:
        found.append(f"{ipynb.name} has outputs or execution counts in cells {dirty}")
    tagged = sum("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    if tagged != 1:
        found.append(f"{ipynb.name} has {tagged} cells tagged 'parameters', expected exactly one")
    # The comparison jupytext's contents manager makes: both files written in the text format must be equal.
    from_ipynb = _as_text(nb)
    from_text = _as_text(jupytext.read(text, fmt=TEXT_FORMAT))
    if from_ipynb != from_text:
        diff = difflib.unified_diff(from_ipynb, from_text, ipynb.name, text.name, n=1)
        shown = "".join(list(diff)[:40])
        found.append(f"{ipynb.name} and {text.name} hold different cells:\n{shown}")
    return found


def clear_outputs(ipynb: Path) -> bool:
    """Remove outputs and execution counts from a notebook; True when it had some."""
    import nbformat

    nb = nbformat.read(ipynb, as_version=4)
    if not _dirty_cells(nb):
        return False
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    ipynb.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return True


def sync(folder: Path) -> int:
    pairs = _pairs(folder)
    if not pairs:
        print(f"no notebooks in {folder}", file=sys.stderr)
        return 1
    # jupytext reads the pairing from jupytext.toml; an .ipynb without its .py (or the reverse) gets one
    files = [str(ipynb if ipynb.exists() else text) for ipynb, text in pairs.values()]
    result = subprocess.run([sys.executable, "-m", "jupytext", "--sync", *files])
    if result.returncode:
        return result.returncode
    for ipynb, text in pairs.values():
        if clear_outputs(ipynb):
            os.utime(text)  # the text file stays the newer one, as jupytext keeps it
            print(f"cleared the outputs of {ipynb}")
    return check(folder)


def check(folder: Path) -> int:
    pairs = _pairs(folder)
    if not pairs:
        print(f"no notebooks in {folder}", file=sys.stderr)
        return 1
    bad = {}
    for stem, (ipynb, text) in pairs.items():
        found = problems(ipynb, text)
        if found:
            bad[stem] = found
    for stem, found in bad.items():
        for problem in found:
            print(f"{stem}: {problem}", file=sys.stderr)
    if bad:
        print(f"out of sync: {', '.join(bad)}. Fix: {FIX}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a pair differs or a notebook has outputs")
    parser.add_argument("--dir", type=Path, default=NOTEBOOKS_DIR, help="the notebooks' folder (default notebooks/)")
    args = parser.parse_args(argv)
    return check(args.dir) if args.check else sync(args.dir)


if __name__ == "__main__":
    sys.exit(main())
