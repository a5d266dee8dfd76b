"""Distributed runs (issue 22): a DDP training recorded on 2 ranks, explained in one process,
and the sharded explainer on 2 ranks against one process. The two ranks are processes this
file starts (torch.multiprocessing, spawn; gloo on the CPU), once for all tests
(tests/_distributed_runs.py says what each does).

Tolerances. The DDP run and the one-process run of the same global batches differ in how
their gradients are summed (two ranks' means averaged, against one sum): the weights differ
by rounding, ~1e-16 relative per step, and the explanations by as little; 1e-10 leaves 10^6
of room. The sharded explainer computes each number as one process does, but in batches of
other sizes (a rank's rows of the queries, a share of the columns), which may round
differently: 1e-12 of the largest value leaves 10^4 eps (for the decomposition's residual
delta, of the largest of the terms it is the difference of: delta itself is ~1e-11, and its
rounding that of the prediction and the contributions). Top-k indices must be identical.
"""

import socket
import time

import _distributed_runs as runs
import pytest
import torch
import torch.multiprocessing as mp

import pk_attrib as pk

pytestmark = pytest.mark.slow
LIMIT = 240  # seconds the two ranks may take, together (about 25 s alone on 2 cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Start the two ranks, and meanwhile record the same training in this process."""
    folder = tmp_path_factory.mktemp("ddp")
    context = mp.get_context("spawn")
    port = _free_port()
    data = runs.digits()
    processes = [
        context.Process(target=runs.worker, args=(r, port, str(folder), data))
        for r in range(runs.WORLD)
    ]
    for p in processes:
        p.start()
    reference = runs.reference_run(folder / "reference")
    deadline = time.monotonic() + LIMIT
    for p in processes:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
    reports = {}
    for r in range(runs.WORLD):
        file = folder / f"rank{r}.pt"
        assert file.exists(), f"rank {r} wrote no report (exit code {processes[r].exitcode})"
        reports[r] = torch.load(file)
        assert "error" not in reports[r], reports[r]["error"]
    return {
        "folder": folder,
        "reports": reports,
        "exit": [p.exitcode for p in processes],
        "reference_model": reference,
    }


@pytest.fixture(scope="module")
def one_process(ranks):
    """The DDP store explained in this process (no process group: the engine works alone)."""
    torch.set_num_threads(1)
    model = runs.mlp()
    path = pk.TrainingPath.load(ranks["folder"] / "ddp")
    path.load_into(model)
    explainer = pk.PathKernelInfluence(
        model, runs.train_set(), path, torch.nn.CrossEntropyLoss(), accumulation="mean",
        show_progress=False,
    )  # fmt: skip
    return explainer, runs.explain_all(explainer)


def close(a, b, rel):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(b.abs().max())
    assert scale > 0
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale


def test_rank_zero_writes_every_ranks_batches_in_rank_order(ranks):
    path = pk.TrainingPath.load(ranks["folder"] / "ddp")
    reference = pk.TrainingPath.load(ranks["folder"] / "reference")
    assert path.manifest["world_size"] == 2 and "world_size" not in reference.manifest
    assert len(path) == len(reference) == ranks["reports"][0]["steps"] == 17
    for s in range(len(path)):
        assert torch.equal(path.step(s).indices, reference.step(s).indices)
        assert torch.equal(path.step(s).batch_sizes, reference.step(s).batch_sizes)
    # a no_sync step: 2 micro-batches per rank, rank 0's first; the padded index twice
    step = path.step(11)
    assert step.batch_sizes.tolist() == [20, 20, 20, 20]
    first = runs.rank_batches(1, 0)[:2] + runs.rank_batches(1, 1)[:2]
    assert torch.equal(step.indices, torch.cat(first))
    drawn = torch.cat([path.step(s).indices for s in range(11)])
    assert len(drawn) == 402 and len(set(drawn.tolist())) == runs.N_TRAIN
    # rank 1 wrote nothing of its own: one store, rank 0's
    assert sorted(p.name for p in ranks["folder"].iterdir() if p.is_dir()) == [
        "ddp",
        "dropout",
        "reference",
    ]


def test_ddp_run_explained_in_one_process_is_exact(ranks, one_process):
    explainer, found = one_process
    q, y = runs.queries(20)
    dec = explainer.attribute(q, target=y)
    assert float(dec.relative_delta.abs().max()) <= 1e-8
    assert dec.diagnostics.max_reconstruction_error <= 1e-12
    # the same global batches trained in one process give the same contributions
    model = ranks["reference_model"]
    path = pk.TrainingPath.load(ranks["folder"] / "reference")
    ref = pk.PathKernelInfluence(
        model, runs.train_set(), path, torch.nn.CrossEntropyLoss(), accumulation="mean",
        show_progress=False,
    ).attribute(q, target=y)  # fmt: skip
    close(dec.contributions, ref.contributions, 1e-10)
    close(dec.bias, ref.bias, 1e-10)
    assert torch.equal(dec.contributions, found["attribute"][0])


def test_dropout_under_ddp_is_replayed_from_every_ranks_state(ranks):
    path = pk.TrainingPath.load(ranks["folder"] / "dropout")
    step = path.step(0)
    states = step.rng_states
    assert len(states) == 2 and not torch.equal(states[0][0], states[1][0])  # two ranks' own
    model = runs.mlp(dropout=0.2)
    path.load_into(model)
    q, y = runs.queries(6)
    explainer = pk.PathKernelInfluence(
        model.eval(), runs.train_set(), path, torch.nn.CrossEntropyLoss(), show_progress=False
    )
    dec = explainer.attribute(q, target=y)  # (a ReconstructionWarning would fail the test)
    assert explainer._engine.replay is not None
    assert float(dec.relative_delta.abs().max()) <= 1e-8
    assert dec.diagnostics.max_reconstruction_error <= 1e-10


@pytest.mark.parametrize("rank", [0, 1])
def test_sharded_scores_equal_one_process(ranks, one_process, rank):
    _, expected = one_process
    found = ranks["reports"][rank]
    assert found["engine"] == "ShardedEngine"
    *got, got_delta = found["attribute"]
    *want, want_delta = expected["attribute"]
    for a, b in zip(got, want, strict=True):  # contributions, bias, prediction
        close(a, b, 1e-12)
    # delta = prediction - bias - sum of contributions, a difference of terms far larger
    # than itself (~1e-11 here): it rounds at their scale, not its own
    contributions, bias, prediction = (torch.as_tensor(t, dtype=torch.float64) for t in want)
    terms = prediction.abs() + bias.abs() + contributions.abs().sum(dim=-1)
    assert float((got_delta - want_delta).abs().max()) <= 1e-12 * float(terms.max())
    assert torch.equal(found["attribute_nodes"], expected["attribute_nodes"])
    assert found["attribute_evals"] == expected["attribute_evals"]
    for key in ("top40", "top4", "top_counterfactual"):  # by queries; by training examples
        assert torch.equal(found[key][0], expected[key][0])
        close(found[key][1], expected[key][1], 1e-12)
    for key in ("cosine4", "self", "self_contribution", "counterfactual"):
        assert found[key].shape == expected[key].shape
        close(found[key], expected[key], 1e-12)


@pytest.mark.parametrize("rank", [0, 1])
def test_sharded_kinked_steps_equal_one_process(ranks, rank):
    """A ReLU MLP: each rank splits its own queries' steps at their kinks; the gathered
    decomposition and node counts are those of one process holding every query."""
    contributions, delta, nodes, evals = ranks["reports"][rank]["relu"]
    want = runs.relu_attribute(*runs.relu_path())
    close(contributions, want[0], 1e-12)
    assert int(want[2].max()) > 2  # (steps were split)
    assert torch.equal(nodes, want[2])
    assert evals == want[3]
    assert float(delta.abs().max()) <= 1e-8 * float(want[0].abs().max())


def test_a_rank_that_fails_or_dies_stops_the_others(ranks):
    reports = ranks["reports"]
    assert reports[1]["failure"] == ("RuntimeError", "injected failure on rank 1")
    kind, message = reports[0]["failure"]
    assert kind == "DistributedError" and "rank(s) [1] raised an error" in message
    # rank 1 dies mid-influence (os._exit): rank 0 is told at its next collective
    assert ranks["exit"] == [0, 17]
    death = torch.load(ranks["folder"] / "death0.pt")
    kind, message = death["outcome"]
    assert kind == "DistributedError" and "lost the other ranks" in message
    assert death["seconds"] < runs.TIMEOUT


def test_what_is_refused_says_why(ranks):
    for r in range(runs.WORLD):
        refused = ranks["reports"][r]["refused"]
        assert "sharded over the ranks (FSDP's fully_shard" in refused["fsdp"]
    # an in-memory recording: rank 0 holds the path, rank 1 is told where it is
    assert ranks["reports"][0]["refused"]["memory"].tolist() == [0, 2, 1, 3]
    assert "read recorder.path on rank 0" in ranks["reports"][1]["refused"]["memory"]


def test_without_a_process_group_nothing_changes(tmp_path):
    model = runs.mlp()
    opt = runs.optimizer(model)
    with pytest.raises(ValueError, match="init_process_group"):
        pk.PathRecorder(model, opt, distributed=True)
    recorder = pk.PathRecorder(model, opt, distributed=None)
    assert recorder._ranks is None
    recorder.close()
    with pytest.raises(ValueError, match="use None, True or False"):
        pk.PathRecorder(model, opt, distributed="yes")


def test_the_world_size_divides_each_ranks_accumulation(tmp_path):
    from pk_attrib.explain.distributed import world_accumulation

    model = runs.mlp()
    opt = runs.optimizer(model)
    x, y = runs.train_set().tensors
    with pk.PathRecorder(model, opt, store=tmp_path / "s", dataset_size=runs.N_TRAIN) as rec:
        rec.record_batch([0, 1])
        torch.nn.functional.cross_entropy(model(x[:2]), y[:2]).backward()
        opt.step()
    path = pk.TrainingPath.load(tmp_path / "s")
    assert [world_accumulation(path, a) for a in ("sum", "mean", 3)] == ["sum", "mean", 3]
    path.manifest["world_size"] = 4
    assert [world_accumulation(path, a) for a in ("sum", "mean", 3)] == [4, "mean", 12]
    # a store recorded on 4 ranks resumes on 4 only; a world size below 1 is damage
    manifest = tmp_path / "s" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"every": 1', '"every": 1, "world_size": 4'))
    with pytest.raises(pk.StoreMismatchError, match="recorded on 4 rank"):
        pk.PathRecorder(model, opt, store=tmp_path / "s")
    manifest.write_text(text.replace('"every": 1', '"every": 1, "world_size": 0'))
    with pytest.raises(pk.CorruptStoreError, match="world_size"):
        pk.TrainingPath.load(tmp_path / "s")
