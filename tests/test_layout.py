"""The package's layout: stages that import in one direction, a stable public surface, and
stores written by earlier versions that still load and explain."""

import ast
import shutil
import sys
from pathlib import Path

import torch

import pk_attrib as pk
from pk_attrib.testing import reference_decomposition

PACKAGE = Path(pk.__file__).parent
DATA = Path(__file__).parent / "data"

# what the documentation and users import; changing it is a change of the public API
PUBLIC = [
    "ArgumentError",
    "ArgumentTypeError",
    "CorruptStoreError",
    "Decomposition",
    "Diagnostics",
    "DistributedError",
    "FormatVersionError",
    "IndexOutOfRangeError",
    "LossReductionError",
    "MissingBatchIndicesError",
    "NoCheckpointsError",
    "NonFiniteError",
    "NotAStoreError",
    "PathKernelInfluence",
    "PathRecorder",
    "PkAttribError",
    "PkAttribWarning",
    "ProjectorKind",
    "Quadrature",
    "QuadratureWarning",
    "Ranked",
    "ReconstructionWarning",
    "RecordingError",
    "RowDependenceError",
    "Step",
    "StoreChangedError",
    "StoreError",
    "StoreMismatchError",
    "TopK",
    "TracInCP",
    "TrainingPath",
    "UnsupportedError",
    "VectorizationWarning",
    "__version__",
]

# stage -> the stages it may import (record/ -> engine/ -> explain/ -> the plots and CLI)
ALLOWED = {
    "record": {"record", "exceptions"},
    "engine": {"engine", "record", "exceptions", "decomposition"},
    "explain": {"explain", "engine", "record", "exceptions", "decomposition"},
    # framework callbacks drive a PathRecorder (docs/architecture.md)
    "integrations": {"integrations", "record", "exceptions"},
}


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(f): f for f in PACKAGE.rglob("*.py")}


def _imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules this module imports, anywhere in it (lazy imports too)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(file.read_text())
    typing_only = {  # imports under `if TYPE_CHECKING:` never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pk_attrib"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "pk_attrib":
                target = node.module
            else:
                continue
            for alias in node.names:  # `from . import data` imports a module
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return found & set(known)


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, file, known) - {name} for name, file in known.items()}


def test_the_package_has_the_three_stages_and_no_flat_sprawl():
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")))
    assert {"record", "engine", "explain"} <= set(top)
    assert len([p for p in top if p.endswith(".py")]) <= 6, top  # the API on top stays small


def test_each_stage_imports_only_the_stages_before_it():
    wrong = []
    for module, targets in _graph().items():
        stage = module.split(".")[1] if module.count(".") else None
        if stage not in ALLOWED:
            continue
        for target in targets:
            other = target.split(".")[1] if target.count(".") else "pk_attrib"
            if other not in ALLOWED[stage]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_module_imports_itself_through_others():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_no_module_grows_past_what_one_reader_holds():
    long = {name: len(f.read_text().splitlines()) for name, f in _modules().items()}
    assert max(long.values()) <= 600, sorted(long.items(), key=lambda kv: -kv[1])[:3]


def test_the_public_surface_is_unchanged():
    assert sorted(pk.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(pk, name) is not None
    assert pk.viz.waterfall and pk.testing.reference_decomposition  # documented import paths
    # every public class says where it lives (its stage), and the lazy import still works
    assert pk.PathKernelInfluence.__module__ == "pk_attrib.explain.explainer"
    assert pk.PathRecorder.__module__ == "pk_attrib.record.recorder"


def test_a_store_written_before_the_layout_change_loads_and_explains(tmp_path):
    """tests/data/store_v0_1 was written by pk_attrib 0.1.0 at commit 51c59a1, the flat
    layout (tests/data/make_store_v0_1.py): the manifest names no module, so it reads the same."""
    sys.path.insert(0, str(DATA))
    try:
        from make_store_v0_1 import problem
    finally:
        sys.path.remove(str(DATA))
    store = tmp_path / "store"
    shutil.copytree(DATA / "store_v0_1", store)  # the explainer may write a feature cache
    model, data, queries = problem()
    path = pk.TrainingPath.load(store)
    path.verify()
    assert len(path) == 6 and path.optimizer["kind"] == "adamw"
    path.load_into(model)
    target = torch.tensor([0, 1, 2])
    loss_fn = torch.nn.CrossEntropyLoss()
    dec = pk.PathKernelInfluence(  # (any warning fails the test: filterwarnings = error)
        model, data, path, loss_fn, quadrature=4, show_progress=False
    ).attribute(queries, target=target)
    assert dec.diagnostics.max_reconstruction_error < 1e-10
    ref = reference_decomposition(model, data, path, loss_fn, queries, target, q=4)
    torch.testing.assert_close(dec.contributions, ref["contributions"], rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(
        dec.terms["weight_decay"], ref["weight_decay"], rtol=1e-8, atol=1e-14
    )
    with torch.no_grad():
        expected = model(queries)[torch.arange(3), target]
    torch.testing.assert_close(dec.prediction, expected, rtol=0, atol=1e-12)
    # resuming it with this version appends to it
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    with pk.PathRecorder(model, optimizer, store=store) as recorder:
        recorder.record_batch([0, 1, 2])
        optimizer.zero_grad()
        loss_fn(model(data.tensors[0][:3]), data.tensors[1][:3]).backward()
        optimizer.step()
    assert len(pk.TrainingPath.load(store)) == 7
