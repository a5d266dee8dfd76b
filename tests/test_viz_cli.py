"""Plots (checked through their data on the Agg backend) and the command line."""

import matplotlib

matplotlib.use("Agg")

import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch
from test_engine import OPTIMIZERS, digits, digits_mlp, record, train_set

import pk_attrib as pk
from pk_attrib import viz
from pk_attrib.cli import main


@pytest.fixture(scope="module")
def decomposition():
    torch.manual_seed(30)
    model = digits_mlp(hidden=8)
    data = train_set(n=40)
    path = record(model, OPTIMIZERS["sgd_0.1"](model.parameters()), data, batch_size=10)
    x, y = digits()
    ex = pk.PathKernelInfluence(model, data, path, torch.nn.CrossEntropyLoss(), show_progress=False)
    return ex.attribute(x[1500:1506], target=y[1500:1506], kernel=True), data


def test_import_does_not_load_matplotlib():
    code = "import sys, pk_attrib; assert 'matplotlib' not in sys.modules, 'matplotlib loaded'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_waterfall_walks_from_bias_to_prediction(decomposition):
    dec, _ = decomposition
    ax = viz.waterfall(dec, query=2, k=5)
    bars = ax.patches
    assert len(bars) == 1 + 5 + 2
    assert bars[0].get_width() == pytest.approx(float(dec.bias[2]))
    end = bars[-1].get_x() + bars[-1].get_width()
    assert end == pytest.approx(float(dec.prediction[2]), abs=1e-9)
    widths = [abs(b.get_width()) for b in bars[1:6]]
    assert widths == sorted(widths, reverse=True)
    assert widths[0] == pytest.approx(float(dec.contributions[2].abs().max()))
    plt.close("all")


def test_influential_images_show_the_top_examples(decomposition):
    dec, data = decomposition
    images = data.tensors[0].reshape(-1, 8, 8)
    axes = viz.influential_images(
        images[0], images, dec, query=1, k=3, train_labels=data.tensors[1].tolist()
    )
    top = dec.top_k(3)
    assert len(axes) == 7
    assert axes[0].get_title() == f"query\nf(x)={float(dec.prediction[1]):.2f}"
    for j, ax in enumerate(axes[1:4]):
        i = int(top.proponents.indices[1, j])
        assert torch.equal(torch.as_tensor(ax.images[0].get_array()), images[i])
        assert ax.get_title().startswith(f"#{i} ")
    for j, ax in enumerate(axes[4:]):
        assert ax.get_title().startswith(f"#{int(top.opponents.indices[1, j])} ")
    labelled = viz.influential_images(images[0], images, dec, query=1, k=3, query_label=7)
    assert labelled[0].get_title() == f"query: label 7\nf(x)={float(dec.prediction[1]):.2f}"
    plt.close("all")


def test_completeness_plot_puts_every_query_on_the_diagonal(decomposition):
    dec, _ = decomposition
    points = viz.completeness(dec).collections[0].get_offsets()
    torch.testing.assert_close(torch.as_tensor(points[:, 0]), dec.prediction)
    torch.testing.assert_close(torch.as_tensor(points[:, 1]), dec.prediction, rtol=0, atol=1e-6)
    plt.close("all")


def test_kernel_by_class_averages_the_kernel(decomposition):
    dec, data = decomposition
    _, y = digits()
    q, t = y[1500:1506], data.tensors[1]
    ax = viz.kernel_by_class(dec.kernel, q.tolist(), t.tolist())
    means = torch.as_tensor(ax.images[0].get_array())
    kernel = dec.kernel[:, torch.arange(len(t)), t]  # each example's own-label component
    a, b = int(torch.unique(q)[0]), int(torch.unique(t)[1])
    assert float(means[0, 1]) == pytest.approx(float(kernel[q == a][:, t == b].mean()))
    plt.close("all")


def test_self_influence_roc_matches_a_hand_count():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2])
    flipped = torch.tensor([True, False, False, True, False])
    ax = viz.self_influence_roc(scores, flipped)
    fpr, tpr = ax.lines[-1].get_xydata().T
    assert list(tpr) == [0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert list(fpr) == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert "AUC 0.833" in ax.get_legend().get_texts()[0].get_text()
    plt.close("all")


def test_demo_runs_end_to_end_and_inspect_checks_the_store(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    from pk_attrib.cli import _digits

    titles = []
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--queries", "2"]) == 0
    out = capsys.readouterr().out
    assert "relative delta" in out and "top proponents" in out and "top opponents" in out
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    _, y = _digits(0)  # the demo's queries are the digits after the 1,500 training ones
    query_titles = [t for t in titles if t.startswith("query")]
    assert [t.split("\n")[0] for t in query_titles] == [
        f"query: label {int(v)}" for v in y[1500:1502]
    ]
    assert main(["inspect", str(tmp_path / "store")]) == 0
    assert "every tensor file matches" in capsys.readouterr().out
    shard = next((tmp_path / "store").glob("shard-*"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    assert main(["inspect", str(tmp_path / "store")]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_testing_and_viz_are_attributes_of_a_fresh_import():
    """The docs write pk.testing.* and pk.viz.* after `import pk_attrib as pk` alone."""
    import subprocess
    import sys

    code = (
        "import pk_attrib as pk; "
        "print(pk.testing.reference_decomposition.__name__, pk.viz.waterfall.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference_decomposition", "waterfall"]


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["inspect", "--help"]])
def test_command_line_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: pk-attrib {' '.join(argv[:-1])}".rstrip() + " [-h]")
    for markup in ("``", ":func:", ":class:", ".. "):
        assert markup not in text, f"reST markup {markup!r} in the help:\n{text}"
    if argv == ["--help"]:
        assert "demo" in text and "inspect" in text and "pk-attrib COMMAND --help" in text
    else:  # each command says what it does, not only its options
        assert len(text.split("\n\n")[1]) > 200
