"""Recording through a framework's trainer: the DataLoader tap, HF's Trainer, Lightning.

Each run is explained afterwards and must be exact: relative delta ≤ 1e-6 in float64, no
ReconstructionWarning (pytest turns warnings into errors), and the contributions equal to
the float64 reference. Tiny models built in code, data made in code, nothing downloaded.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

import pk_attrib as pk
from pk_attrib.record.sampling import LoaderTap
from pk_attrib.testing import reference_decomposition

F64 = torch.float64

# Lightning's own warnings on this machine, not the callback's: its pytree helper uses a
# LeafSpec that torch deprecates, and it suggests more DataLoader workers on larger machines
LIGHTNING_NOISE = pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning",
    "ignore:The 'train_dataloader' does not have many workers",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_importing_the_integrations_imports_no_framework():
    code = (
        "import sys, pk_attrib as pk; pk.integrations; import pk_attrib.integrations\n"
        "print(sorted({'transformers', 'lightning', 'accelerate'} & set(sys.modules)))\n"
        "sys.modules['lightning'] = None  # as if it were not installed\n"
        "try:\n    pk.integrations.lightning\nexcept ImportError as e:\n    print(e)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    loaded, missing = done.stdout.splitlines()
    assert loaded == "[]"
    assert missing.startswith("pk_attrib.integrations.lightning needs lightning: pip install")
    with pytest.raises(AttributeError, match="no attribute 'keras'"):
        pk.integrations.keras  # noqa: B018


# -- the DataLoader tap ---------------------------------------------------------------------------


def foreign_loop(loader, tap, epochs=3, cut=None):
    """A framework's loop: iterates the loader itself (epoch `cut` stops halfway) and asks
    the tap for each batch's indices; returns (taken, what each batch holds)."""
    taken, held = [], []
    for epoch in range(epochs):
        for k, (_, index) in enumerate(loader):
            if epoch == cut and k == len(loader) // 2:
                break  # the rest of this pass was drawn (workers prefetch) but is never taken
            taken.append(torch.as_tensor(tap.next_indices()).reshape(-1))
            held.append(index.reshape(-1))
    return taken, held


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=3, shuffle=True),
        dict(batch_size=3, shuffle=True, num_workers=2),
        dict(batch_size=3, shuffle=True, num_workers=2, persistent_workers=True),
        dict(batch_sampler=BatchSampler(SequentialSampler(range(14)), 4, drop_last=True)),
        dict(batch_size=None, shuffle=True),
    ],
    ids=["shuffle", "workers", "persistent", "batch_sampler", "unbatched"],
)
def test_the_tap_hands_out_the_indices_of_each_batch_taken(kwargs):
    data = TensorDataset(torch.randn(14, 2), torch.arange(14))
    loader = DataLoader(data, **kwargs)
    tap = LoaderTap()
    tap.attach(loader)
    taken, held = foreign_loop(loader, tap, cut=1)
    assert len(taken) == 3 * len(loader) - (len(loader) - len(loader) // 2)
    assert all(torch.equal(a, b) for a, b in zip(taken, held, strict=True))
    with pytest.raises(pk.RecordingError, match="no attached DataLoader drew"):
        tap.next_indices()
    tap.detach()
    assert "_get_iterator" not in loader.__dict__
    next(iter(loader))  # untapped again: nothing is noted
    assert not tap._queue


def test_the_tap_refuses_loaders_without_indices():
    tap = LoaderTap()
    with pytest.raises(TypeError, match="IterableDataset"):
        tap.attach(DataLoader(torch.utils.data.IterableDataset()))
    with pytest.raises(pk.RecordingError, match="in_order=False"):
        tap.attach(DataLoader(range(4), num_workers=1, in_order=False))
    with pytest.raises(TypeError, match="DataLoader"):
        tap.attach([torch.zeros(2)])


# -- HuggingFace Trainer --------------------------------------------------------------------------

V, L, N_HF = 24, 6, 20  # vocabulary, sequence length, training examples


def hf_data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (N_HF, L), generator=g)
    labels = torch.randint(0, 3, (N_HF,), generator=g)
    assert len(torch.unique(ids, dim=0)) == N_HF  # each row names its example
    return ids, labels


class HFItems(torch.utils.data.Dataset):
    """What a tokenized dataset gives the Trainer: dicts, with columns the model does not take
    (``remove_unused_columns`` drops them) and ``label`` (the collator renames it)."""

    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "label": int(self.labels[i]), "text": f"#{i}", "id": i}


class HFExamples(torch.utils.data.Dataset):
    """The same examples as the explainer reads them: (input_ids, label)."""

    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.labels[i]


def logits_loss(outputs, labels):
    """The loss BertForSequenceClassification computes inside (mean over the batch)."""
    return F.cross_entropy(outputs.logits, labels)


def logit(outputs, target):
    return outputs.logits.gather(1, target.reshape(-1, 1))[:, 0]


def tiny_bert(dropout=0.0):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=L,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        attn_implementation="eager",  # (torch.func.vmap has no batching rule for CPU SDPA)
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).to(F64)


def hf_trainer(model, data, tmp_path, callback, eval_dataset=None, **args):
    transformers = pytest.importorskip("transformers")
    defaults = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=6,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=3,
        weight_decay=0.01,  # AdamW's decoupled decay
        max_grad_norm=0.0,  # clipping is not explained exactly
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), **{**defaults, **args})
    return transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=data,
        eval_dataset=eval_dataset,
        callbacks=[callback],
    )


@pytest.fixture
def hf(monkeypatch):
    """HF's Trainer (skipped without transformers and accelerate), kept offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


def test_a_trainer_run_recorded_by_the_callback_is_explained_exactly(tmp_path, hf):
    """AdamW, linear warm-up from lr 0, gradient accumulation 2 (5 micro-batches an epoch:
    groups of 2, 2, 1), columns the model does not take, dropout 0.1 (hidden and attention
    probabilities, replayed): 18 steps, exact."""
    ids, labels = hf_data()
    model = tiny_bert(dropout=0.1)
    seen = []  # the input_ids of each training forward, in order

    def note(module, args, kwargs):
        if module.training:
            seen.append(kwargs["input_ids"].clone())

    hook = model.register_forward_pre_hook(note, with_kwargs=True)
    callback = pk.integrations.hf.PathRecorderCallback(store=tmp_path / "run")
    trainer = hf_trainer(model, HFItems(ids, labels), tmp_path, callback)
    trainer.train()
    hook.remove()  # (the explainer runs the model in train mode to see whether to replay)
    path = pk.TrainingPath.load(tmp_path / "run")
    assert callback.recorder.store == tmp_path / "run" and len(callback.path) == len(path) == 18
    # each step's indices are those of the examples the model was trained on, in order
    rows = {tuple(r.tolist()): i for i, r in enumerate(ids)}
    trained = [torch.tensor([rows[tuple(r.tolist())] for r in batch]) for batch in seen]
    assert [s.batch_sizes.tolist() for s in path][:3] == [[4, 4], [4, 4], [4]]
    assert torch.equal(torch.cat([s.indices for s in path]), torch.cat(trained))
    assert sorted(torch.cat(trained[:5]).tolist()) == list(range(N_HF))  # one epoch: each once
    assert path.optimizer["kind"] == "adamw" and path.step(0).lr[0] == 0.0  # warm-up from 0

    # BertForSequenceClassification.forward takes **kwargs, so the Trainer does not divide
    # the micro-batch means by the number of micro-batches: they are summed
    model.eval()
    train, queries, target = HFExamples(ids, labels), ids[:3], labels[:3]
    explainer = pk.PathKernelInfluence(
        model, train, path, logits_loss, loss_reduction="mean", accumulation="sum",
        quadrature=4, show_progress=False,
    )  # fmt: skip
    dec = explainer.attribute(queries, target=target, output_fn=logit)
    assert float(dec.relative_delta.max()) <= 1e-6
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    ref = reference_decomposition(
        model, train, path, logits_loss, queries, target, q=4, output_fn=logit, replay=True
    )
    scale = ref["contributions"].abs().amax(1, keepdim=True)
    assert float(((dec.contributions - ref["contributions"]).abs() / scale).max()) <= 1e-8
    with pytest.warns(pk.ReconstructionWarning):  # the other scaling does not rebuild the steps
        pk.PathKernelInfluence(
            model, train, path, logits_loss, loss_reduction="mean", accumulation="mean",
            quadrature=4, show_progress=False,
        ).attribute(queries, target=target, output_fn=logit)  # fmt: skip


class LossInside(torch.nn.Module):
    """A model whose forward takes no **kwargs and computes its loss (mean over the batch)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).to(F64)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return (
            logits
            if labels is None
            else {"loss": F.cross_entropy(logits, labels), "logits": logits}
        )


def test_a_model_without_kwargs_has_its_micro_batch_losses_averaged(tmp_path, hf):
    """The Trainer divides each micro-batch's loss by the number of micro-batches of the step
    (2, 2, then 1 an epoch here): accumulation="mean", and neither "sum" nor a fixed 2."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N_HF, 5, generator=g, dtype=F64), torch.randint(0, 3, (N_HF,), generator=g)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return N_HF

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i], "id": i}

    torch.manual_seed(0)
    model = LossInside()
    callback = pk.integrations.hf.PathRecorderCallback()
    trainer = hf_trainer(
        model, Items(), tmp_path, callback,
        num_train_epochs=3, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant",
    )  # fmt: skip
    trainer.train()
    path = callback.path
    assert [len(s.batch_sizes) for s in path] == [2, 2, 1] * 3
    model.eval()
    data, loss_fn = TensorDataset(x, y), torch.nn.CrossEntropyLoss()
    dec = pk.PathKernelInfluence(
        model, data, path, loss_fn, accumulation="mean", show_progress=False
    ).attribute(x[:2], target=y[:2])
    assert float(dec.relative_delta.max()) <= 1e-6
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    for wrong in ("sum", 2):
        with pytest.warns(pk.ReconstructionWarning):
            pk.PathKernelInfluence(
                model, data, path, loss_fn, accumulation=wrong, show_progress=False
            ).attribute(x[:2], target=y[:2])


def test_the_path_ends_at_the_last_step_when_the_trainer_loads_its_best_checkpoint(tmp_path, hf):
    """load_best_model_at_end loads an earlier checkpoint after the last step, before
    on_train_end: the path still ends at the weights the last step reached."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N_HF, 5, generator=g, dtype=F64), torch.randint(0, 3, (N_HF,), generator=g)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return N_HF

        def __getitem__(self, i):
            return {"x": x[i], "labels": y[i]}

    torch.manual_seed(0)
    model = LossInside()
    callback = pk.integrations.hf.PathRecorderCallback()
    trainer = hf_trainer(
        model, Items(), tmp_path, callback, eval_dataset=Items(), num_train_epochs=3,
        optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", eval_strategy="epoch",
        save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="loss",
        greater_is_better=True,  # the worst epoch: the first, not the last
    )  # fmt: skip
    trainer.train()
    path = callback.path
    assert not torch.equal(path.final["net.0.weight"], model.net[0].weight)  # epoch 1's
    path.load_into(model)
    model.eval()
    dec = pk.PathKernelInfluence(
        model, TensorDataset(x, y), path, torch.nn.CrossEntropyLoss(), accumulation="mean",
        show_progress=False,
    ).attribute(x[:2], target=y[:2])  # fmt: skip
    assert dec.diagnostics.max_reconstruction_error < 1e-10


def test_the_trainer_announces_clipping_and_a_mid_epoch_resume_says_what_to_do(tmp_path, hf):
    ids, labels = hf_data()
    callback = pk.integrations.hf.PathRecorderCallback()
    trainer = hf_trainer(
        tiny_bert(), HFItems(ids, labels), tmp_path, callback,
        max_grad_norm=1.0, max_steps=1, save_strategy="steps", save_steps=1,
    )  # fmt: skip
    with pytest.warns(pk.PkAttribWarning, match="max_grad_norm=1.0"):
        trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert len(callback.path) == 1 and checkpoint.is_dir()
    # resumed one step into an epoch of 3 steps, the Trainer skips that step's batches with
    # a new DataLoader: the callback cannot know their indices and says what to do
    callback = pk.integrations.hf.PathRecorderCallback()
    trainer = hf_trainer(tiny_bert(), HFItems(ids, labels), tmp_path, callback, num_train_epochs=1)
    with pytest.raises(pk.RecordingError, match="ignore_data_skip=True"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    callback = pk.integrations.hf.PathRecorderCallback()
    trainer = hf_trainer(
        tiny_bert(), HFItems(ids, labels), tmp_path, callback, num_train_epochs=1,
        ignore_data_skip=True,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert len(callback.path) == 2  # steps 2 and 3 of the epoch, from its first batches on
    assert [s.batch_sizes.tolist() for s in callback.path] == [[4, 4], [4, 4]]


# -- Lightning ------------------------------------------------------------------------------------

N_PL = 30


@pytest.fixture
def pl():
    """Lightning (skipped without it)."""
    return pytest.importorskip("lightning.pytorch")


def lightning_module(dropout=0.0, **hooks):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                torch.nn.Linear(8, 3),
            ).to(F64)  # fmt: skip

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    for name, hook in hooks.items():
        setattr(Classifier, name, hook)
    torch.manual_seed(0)
    return Classifier()


def pl_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_PL, 5, generator=g, dtype=F64)
    return TensorDataset(x, torch.randint(0, 3, (N_PL,), generator=g))


def pl_trainer(callback, **kwargs):
    pl = pytest.importorskip("lightning.pytorch")
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )


@LIGHTNING_NOISE
def test_a_lightning_run_recorded_by_the_callback_is_explained_exactly(pl):
    """SGD with momentum, accumulate_grad_batches=2 over 8 batches an epoch (the last one of
    2 examples), 5 epochs, dropout 0.2 (replayed): 20 steps, each with the indices the seeded
    sampler drew."""
    data = pl_data()
    module = lightning_module(dropout=0.2)
    loader = DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    callback = pk.integrations.lightning.PathRecorderCallback()
    pl_trainer(callback, max_epochs=5, accumulate_grad_batches=2).fit(module, loader)
    path = callback.path
    assert len(path) == 20 and all(len(s.batch_sizes) == 2 for s in path)
    same = DataLoader(
        range(N_PL), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    )
    drawn = torch.cat([batch for _ in range(5) for batch in same])
    assert torch.equal(torch.cat([s.indices for s in path]), drawn)

    # Lightning divides each batch's loss by accumulate_grad_batches
    module.eval()
    x, y = data.tensors
    loss_fn = torch.nn.CrossEntropyLoss()
    explainer = pk.PathKernelInfluence(
        module, data, path, loss_fn, accumulation=2, quadrature=4, show_progress=False
    )
    dec = explainer.attribute(x[:3], target=y[:3])
    assert float(dec.relative_delta.max()) <= 1e-6
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    ref = reference_decomposition(module, data, path, loss_fn, x[:3], y[:3], q=4, replay=True)
    scale = ref["contributions"].abs().amax(1, keepdim=True)  # (κ = 1/|B| there: halve it)
    assert float(((dec.contributions - ref["contributions"] / 2).abs() / scale).max()) <= 1e-8


@LIGHTNING_NOISE
def test_loaders_from_train_dataloader_reloaded_and_an_epoch_cut_short_are_exact(pl):
    """The module makes a new DataLoader each epoch (reload_dataloaders_every_n_epochs=1), and
    in epoch 1 its on_train_batch_start returns -1 on the second batch of a group: the group's
    first batch ran, then Lightning ended the epoch without a step (and zeroes the gradients
    at the next epoch's first batch), so neither batch belongs to a step."""
    data = pl_data()
    x, y = data.tensors
    fed = {}  # (epoch, batch_idx) -> the dataset indices training_step got

    def train_dataloader(self):
        g = torch.Generator().manual_seed(100 + self.current_epoch)
        return DataLoader(data, batch_size=4, shuffle=True, generator=g)

    def on_train_batch_start(self, batch, batch_idx):
        return -1 if (self.current_epoch, batch_idx) == (1, 3) else None

    def training_step(self, batch, batch_idx):
        rows = (batch[0][:, None] == x[None]).all(-1).nonzero()[:, 1]
        fed[self.current_epoch, batch_idx] = rows
        return F.cross_entropy(self(batch[0]), batch[1])

    module = lightning_module(
        train_dataloader=train_dataloader,
        on_train_batch_start=on_train_batch_start,
        training_step=training_step,
    )
    callback = pk.integrations.lightning.PathRecorderCallback()
    trainer = pl_trainer(
        callback, max_epochs=3, accumulate_grad_batches=2, reload_dataloaders_every_n_epochs=1
    )
    trainer.fit(module)
    assert "train_dataloader" not in module.__dict__  # the module's own hook again
    path = callback.path
    assert len(fed) == 8 + 3 + 8 and (1, 3) not in fed
    assert len(path) == 4 + 1 + 4
    stepped = [rows for key, rows in fed.items() if key != (1, 2)]
    assert torch.equal(torch.cat([s.indices for s in path]), torch.cat(stepped))
    module.eval()
    dec = pk.PathKernelInfluence(
        module, data, path, torch.nn.CrossEntropyLoss(), accumulation=2, show_progress=False
    ).attribute(x[:2], target=y[:2])
    assert float(dec.relative_delta.max()) <= 1e-6
    assert dec.diagnostics.max_reconstruction_error < 1e-10


@LIGHTNING_NOISE
def test_lightning_clipping_is_announced_and_several_loaders_are_refused(pl):
    data = pl_data()
    loader = DataLoader(data, batch_size=10)
    callback = pk.integrations.lightning.PathRecorderCallback()
    with pytest.warns(pk.PkAttribWarning, match="gradient clipping"):
        pl_trainer(callback, max_epochs=1, gradient_clip_val=0.5).fit(lightning_module(), loader)
    assert len(callback.path) == 3
    callback = pk.integrations.lightning.PathRecorderCallback()
    with pytest.raises(pk.RecordingError, match="not one torch DataLoader"):
        pl_trainer(callback, max_epochs=1).fit(lightning_module(), [loader, loader])


# -- the guide page's scripts ---------------------------------------------------------------------

GUIDE = os.path.join(os.path.dirname(__file__), "..", "docs", "guide", "integrations.md")


def guide_script(framework):
    """The complete script of docs/guide/integrations.md that imports `framework`."""
    with open(GUIDE, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    (script,) = [b for b in blocks if b.startswith("import") and framework in b.split("\n\n")[0]]
    return script


@pytest.mark.parametrize("framework", ["transformers", "lightning"])
@LIGHTNING_NOISE
def test_the_guide_scripts_run_and_are_exact(framework, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("accelerate" if framework == "transformers" else "lightning.pytorch")
    pytest.importorskip(framework)
    monkeypatch.chdir(tmp_path)
    exec(compile(guide_script(framework), GUIDE, "exec"), {"__name__": "__main__"})
    steps, delta = re.search(r"(\d+) steps; relative delta (\S+)", capsys.readouterr().out).groups()
    assert int(steps) == {"transformers": 9, "lightning": 24}[framework]
    assert float(delta) <= 1e-6
