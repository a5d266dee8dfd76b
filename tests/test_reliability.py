"""What interruptions, damaged or crafted files, full disks and concurrent access do to a store,
and that the Captum-style methods check what `attribute` checks (issue 24)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _runs import replay

import pk_attrib as pk

TESTS = Path(__file__).parent


def child(code: str) -> subprocess.Popen:
    script = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_is_the_run(path):
    """Every snapshot of the path, the final one included, is the run's own at that step."""
    expected = replay(len(path))
    for s in range(len(path) + 1):
        for name, value in expected[s].items():
            assert torch.equal(path.params(s)[name], value), (s, name)


# -- 1. Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.3, 0.45, 0.6, 0.8, 1.1])
def test_ctrl_c_while_a_step_waits_for_a_slow_disk_never_stores_wrong_final_weights(
    tmp_path, delay
):
    """A real SIGINT to a process whose writer is slow: the interrupt lands while the step
    hook waits for room in the writer's queue, and the step's record is dropped. The store
    must then end at its last recorded step (it once stored the weights after the dropped
    step as final, and said it was complete)."""
    store = tmp_path / "s"
    proc = child(
        f"""
        import time
        import pk_attrib as pk
        import pk_attrib.record.writer as writer
        from _runs import make, run_steps

        write = writer.AsyncShardWriter._write_shard

        def slow(self, records):
            time.sleep(0.03)
            write(self, records)

        writer.AsyncShardWriter._write_shard = slow
        model, optimizer, x, y = make()
        try:
            with pk.PathRecorder(model, optimizer, store={str(store)!r}, dataset_size=40,
                                 shard_bytes=1, max_queue_bytes=1) as recorder:
                print("recording", flush=True)
                run_steps(model, optimizer, x, y, recorder, 0, 100000)
        except KeyboardInterrupt:
            print("interrupted", recorder.steps_recorded, flush=True)
        """
    )
    assert proc.stdout.readline().strip() == "recording"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert out.startswith("interrupted"), (out, err)
    path = pk.TrainingPath.load(store)
    path.verify()
    assert len(path) >= 1
    assert_is_the_run(path)  # the final weights included
    if path.complete:  # closed between steps: the weights then were the last step's end
        assert len(path) == int(out.split()[1])
