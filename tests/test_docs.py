"""The documentation: the README's example runs, the API reference covers the public names,
every page is reachable, CI runs the README's test command, and the tutorial pages render.

These read the markdown and mkdocs.yml as text and import the documented objects; they need
neither mkdocs nor a network (CI's `mkdocs build --strict` checks the rendered site).
"""

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pk_attrib as pk

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^::: *([\w.]+)", re.MULTILINE)


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ```language blocks of a markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def resolve(dotted: str):
    """The object a mkdocstrings identifier names: the longest importable module prefix,
    then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def api_directives() -> dict[str, list[str]]:
    """Each API reference page's `::: identifier` directives."""
    return {
        page.name: DIRECTIVE.findall(page.read_text(encoding="utf-8"))
        for page in sorted((DOCS / "api").glob("*.md"))
    }


def documented_objects() -> list:
    return [resolve(d) for directives in api_directives().values() for d in directives]


def test_api_reference_directives_name_existing_objects():
    directives = [d for found in api_directives().values() for d in found]
    assert len(directives) >= 30, directives
    for dotted in directives:
        assert dotted.startswith("pk_attrib"), dotted
        resolve(dotted)  # raises when a page names something that is gone


def test_every_public_name_appears_in_the_api_reference():
    objects = documented_objects()
    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    missing = []
    for name in pk.__all__:
        value = getattr(pk, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            if not any(obj is value for obj in objects):
                missing.append(name)
        elif f"pk_attrib.{name}" not in text:  # __version__: a value, described in words
            missing.append(name)
    assert not missing, f"pk_attrib.__all__ names missing from docs/api/*.md: {missing}"


@pytest.mark.parametrize("module", ["pk_attrib.viz", "pk_attrib.testing"])
def test_every_public_function_of_viz_and_testing_is_documented(module):
    mod = importlib.import_module(module)
    public = [
        f
        for name, f in inspect.getmembers(mod, inspect.isfunction)
        if not name.startswith("_") and f.__module__ == module
    ]
    assert public, module
    objects = documented_objects()
    missing = [f.__name__ for f in public if not any(obj is f for obj in objects)]
    assert not missing, f"{module} functions missing from docs/api/*.md: {missing}"


def test_every_docs_page_and_tutorial_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)$", config, re.MULTILINE))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    tutorials = {f"tutorials/{p.stem}.md" for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.py")}
    assert len(tutorials) == 4
    assert pages | tutorials | {"changelog.md"} == nav


def test_source_points_to_the_docs_not_to_design_notes():
    """Docstrings cite docs/*.md pages that exist, and no DESIGN.md (not in the repository)."""
    cited = set()
    for source in (ROOT / "pk_attrib").rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, f"{source} cites DESIGN.md"
        cited |= set(re.findall(r"docs/[\w/-]+\.md", text))
    assert "docs/mathematics.md" in cited
    for page in cited:
        assert (ROOT / page).is_file(), page


def test_ci_runs_the_readme_test_command_then_builds_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [b.strip() for b in fenced(readme, "bash") if "python -m pytest" in b]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands[0] in ci, f"{commands[0]!r} is not a line of .ci/run"
    docs = next(i for i, line in enumerate(ci) if "mkdocs build --strict" in line)
    assert docs > ci.index(commands[0])
    assert any('".[docs]"' in line for line in ci[:docs])


def test_readme_and_getting_started_show_the_same_example():
    readme = fenced((ROOT / "README.md").read_text(encoding="utf-8"), "python")
    guide = fenced((DOCS / "getting-started.md").read_text(encoding="utf-8"), "python")
    assert len(readme) == 1 and len(guide) == 1
    assert readme == guide


@pytest.mark.slow
def test_readme_example_runs_and_reruns(tmp_path):
    (example,) = fenced((ROOT / "README.md").read_text(encoding="utf-8"), "python")
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    for run in (1, 2):  # the second run meets whatever the first one left behind
        done = subprocess.run(
            [sys.executable, "-W", "error", str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"run {run}:\n{done.stdout}\n{done.stderr[-4000:]}"
        lines = done.stdout.splitlines()
        queries = [line for line in lines if line.startswith("query ")]
        assert len(queries) == 3
        for line in queries:  # f(x) = bias + Σ c_i + delta, as printed
            f, bias, total, delta = (
                float(v) for v in re.findall(r"[-+]?\d+\.\d+(?:e[-+]\d+)?", line)[-4:]
            )
            assert f == pytest.approx(bias + total, abs=2e-6)
            assert abs(delta) < 1e-6
        assert sum(line.startswith("  proponent #") for line in lines) == 9
        (relative,) = re.findall(r"completeness: max relative delta (\S+)", done.stdout)
        assert float(relative) < 1e-8


def load_hooks():
    spec = importlib.util.spec_from_file_location(
        "mkdocs_hooks", ROOT / "tools" / "mkdocs_hooks.py"
    )
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


@pytest.mark.parametrize("script", sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py")))
def test_a_tutorial_page_holds_every_cell_of_its_script(script):
    hooks = load_hooks()
    cells = hooks.split_cells(script.read_text(encoding="utf-8"))
    page = hooks.render(script, None, None)
    assert page.startswith("# "), page[:80]  # the tutorial's title is the page's
    code = sum(kind == "code" for kind, _ in cells)
    quoted = sum(source.count("```python\n") for kind, source in cells if kind == "markdown")
    assert code >= 5 and page.count("```python\n") == code + quoted
    for _, source in cells:
        assert source in page
    # markdown cells lose their comment marks: "# ## Heading" becomes "## Heading"
    assert not any(line.startswith("# #") for line in page.splitlines())
    assert page.count("\n## ") == script.read_text(encoding="utf-8").count("\n# ## ")


def test_the_tutorial_runner_keeps_each_cells_output_and_figures(tmp_path, monkeypatch):
    hooks = load_hooks()
    monkeypatch.setenv("PK_TUTORIAL_OUT", "")
    monkeypatch.setenv("MPLBACKEND", "")
    script = tmp_path / "99_demo.py"
    script.write_text(
        "# %% [markdown]\n# # A title\n#\n# Some text.\n\n"
        "# %%\nimport os\nfrom pathlib import Path\nout = Path(os.environ['PK_TUTORIAL_OUT'])\n"
        "print('first', 1 + 1)\n\n"
        "# %%\n(out / 'a.png').write_bytes(b'png')\nprint('wrote', out / 'a.png')\n\n"
        "# %%\nx = 3\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    out.mkdir()
    results = hooks.run_cells(script, out)
    assert results == [
        {"stdout": "first 2\n", "figures": []},
        {"stdout": f"wrote {out / 'a.png'}\n", "figures": ["a.png"]},
        {"stdout": "", "figures": []},
    ]
    page = hooks.render(script, results, out)
    assert "```text\nfirst 2\n```" in page
    assert "wrote $PK_TUTORIAL_OUT/a.png" in page and "![a.png](a.png)" in page
    assert page.index("print('first'") < page.index("first 2\n```") < page.index("a.png)")
