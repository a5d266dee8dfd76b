"""The tutorials run end to end (each in its own process) and write their figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"

EXPECTED = {
    "01_explain_a_prediction.py": [
        "01_waterfall.png",
        "01_influential_images_0.png",
        "01_influential_images_1.png",
        "01_kernel_by_class.png",
        "01_completeness.png",
    ],
    "02_find_mislabeled_examples.py": [
        "02_self_influence_roc.png",
        "02_top_self_influence.png",
    ],
    "03_migrate_from_tracincp.py": [
        "03_exact_vs_tracin.png",
    ],
    "04_scale_with_projection.py": [
        "04_projection_error.png",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tutorial_runs_and_writes_its_figures(name, tmp_path):
    env = {**os.environ, "PK_TUTORIAL_OUT": str(tmp_path), "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, "-W", "error", str(TUTORIALS / name)],
        cwd=TUTORIALS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"{name} exited with {done.returncode}\n--- stdout ---\n{done.stdout[-4000:]}"
        f"\n--- stderr ---\n{done.stderr[-8000:]}"
    )
    for png in EXPECTED[name]:
        figure = tmp_path / png
        assert figure.is_file(), (
            f"{name} did not write {png}; it wrote {sorted(os.listdir(tmp_path))}"
        )
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"


def test_every_tutorial_is_covered():
    ours = {p.name for p in TUTORIALS.glob("[0-9][0-9]_*.py")}
    assert ours == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tutorial_is_a_percent_script_that_opens_with_markdown(name):
    text = (TUTORIALS / name).read_text(encoding="utf-8")
    assert text.startswith("# %% [markdown]\n# # ")
    cells = text.count("\n# %%\n") + text.count("\n# %% [markdown]\n")
    assert cells >= 10
    assert "plt.show(" not in text and 'matplotlib.use("Agg")' in text
