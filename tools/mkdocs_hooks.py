"""MkDocs hooks: the tutorials and the changelog as pages of the documentation site.

Each ``tutorials/NN_*.py`` (a jupytext percent script) becomes the page
``tutorials/NN_*.md``: its markdown cells as text and its code cells as code blocks, each
followed by what the cell printed and the figures it wrote. The outputs come from running
the script cell by cell in a fresh Python process (``python tools/mkdocs_hooks.py SCRIPT
OUT``, warnings as errors, as the tests run it); a tutorial that fails fails the build.
``PK_DOCS_RUN_TUTORIALS=0`` renders the code without running it, for a quick preview.

``CHANGELOG.md`` becomes the page ``changelog.md``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CELL = "# %%"
MARKDOWN = "# %% [markdown]"


def split_cells(text: str) -> list[tuple[str, str]]:
    """Split a jupytext percent script into cells.

    Args:
        text: The script.

    Returns:
        ``(kind, source)`` per cell, in order: kind ``"markdown"`` (source with the comment
        marks removed) or ``"code"``. Empty cells are left out.
    """
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith(MARKDOWN):
            cells.append(("markdown", []))
        elif line.startswith(CELL):
            cells.append(("code", []))
        elif cells:
            cells[-1][1].append(line)
    out = []
    for kind, lines in cells:
        if kind == "markdown":
            lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines]
        source = "\n".join(lines).strip("\n")
        if source.strip():
            out.append((kind, source))
    return out


def _pictures(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def run_cells(script: Path, out: Path) -> list[dict]:
    """Run a tutorial's code cells in one namespace, recording each cell's output.

    Args:
        script: The tutorial.
        out: The folder its figures go to (``PK_TUTORIAL_OUT``).

    Returns:
        Per code cell: ``{"stdout": what it printed, "figures": PNG files (relative to
        out) it wrote or rewrote}``.
    """
    os.environ["PK_TUTORIAL_OUT"] = str(out)
    os.environ["MPLBACKEND"] = "Agg"
    namespace = {"__name__": "__main__", "__file__": str(script)}
    results = []
    for n, (kind, source) in enumerate(split_cells(script.read_text(encoding="utf-8"))):
        if kind != "code":
            continue
        before = _pictures(out)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(source, f"{script.name} (cell {n})", "exec"), namespace)  # noqa: S102
        after = _pictures(out)
        new = sorted(p for p, t in after.items() if before.get(p) != t)
        results.append({"stdout": printed.getvalue(), "figures": new})
    return results


def render(script: Path, outputs: list[dict] | None, out: Path | None) -> str:
    """The markdown page of a tutorial.

    Args:
        script: The tutorial.
        outputs: `run_cells`'s result, or None to show the code without outputs.
        out: The folder the run wrote to (its path is shown as ``$PK_TUTORIAL_OUT``).

    Returns:
        The page's markdown; figures are linked by their file names, next to the page.
    """
    parts = []
    code_cells = iter(outputs or [])
    for kind, source in split_cells(script.read_text(encoding="utf-8")):
        if kind == "markdown":
            parts.append(source)
            if len(parts) == 1:
                parts.append(_note(script, ran=outputs is not None))
            continue
        parts.append(f"```python\n{source}\n```")
        if outputs is None:
            continue
        result = next(code_cells)
        printed = result["stdout"].rstrip()
        if out is not None:
            printed = printed.replace(str(out), "$PK_TUTORIAL_OUT")
        if printed:
            parts.append(f"```text\n{printed}\n```")
        parts.extend(f"![{name}]({Path(name).name})" for name in result["figures"])
    return "\n\n".join(parts) + "\n"


def _note(script: Path, ran: bool) -> str:
    how = (
        "its outputs below come from running it when this site was built"
        if ran
        else ("this build did not run it (PK_DOCS_RUN_TUTORIALS=0), so no outputs are shown")
    )
    return (
        '!!! note "Run it yourself"\n'
        f"    This page is `tutorials/{script.name}`; {how}. Run it with\n"
        f"    `python tutorials/{script.name}` (its figures go to `$PK_TUTORIAL_OUT`, by\n"
        "    default a new temporary folder), or open it as a notebook with jupytext.\n"
        "    The test suite runs every tutorial end to end."
    )


def _run_all(scripts: list[Path], root: Path, work: Path) -> dict[Path, list[dict]]:
    """Run the tutorials side by side, each in its own process; raise if one fails."""
    running = {}
    for script in scripts:
        out = work / script.stem
        out.mkdir()
        running[script] = subprocess.Popen(
            [sys.executable, "-W", "error", __file__, str(script), str(out)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    results = {}
    failed = []
    for script, process in running.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            failed.append(f"{script.name} exited with {process.returncode}:\n{stderr[-6000:]}")
            continue
        results[script] = json.loads((work / script.stem / "cells.json").read_text())
    if failed:
        from mkdocs.exceptions import PluginError

        raise PluginError("a tutorial failed while building the docs\n" + "\n".join(failed))
    return results


def on_files(files, config):
    """Add the tutorial pages (and their figures) and the changelog page to the site."""
    from mkdocs.structure.files import File

    root = Path(config.config_file_path).resolve().parent
    scripts = sorted((root / "tutorials").glob("[0-9][0-9]_*.py"))
    run = os.environ.get("PK_DOCS_RUN_TUTORIALS", "1") != "0"
    with tempfile.TemporaryDirectory(prefix="pk_docs_tutorials_") as tmp:
        work = Path(tmp)
        outputs = _run_all(scripts, root, work) if run else {}
        for script in scripts:
            out = work / script.stem
            page = render(script, outputs.get(script), out if run else None)
            files.append(File.generated(config, f"tutorials/{script.stem}.md", content=page))
            for result in outputs.get(script, []):
                for name in result["figures"]:
                    content = (out / name).read_bytes()
                    uri = f"tutorials/{Path(name).name}"
                    if files.get_file_from_path(uri) is None:
                        files.append(File.generated(config, uri, content=content))
    changelog = (root / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    return files


if __name__ == "__main__":
    script_path, out_folder = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    cell_outputs = run_cells(script_path, out_folder)
    (out_folder / "cells.json").write_text(json.dumps(cell_outputs), encoding="utf-8")
