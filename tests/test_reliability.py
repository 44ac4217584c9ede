"""Reliability: unsafe or broken files are refused, writes are atomic, failures leave disk intact."""
import os

import pytest
import torch

from common.cli import UserError
from common.runs import load_tensors, read_json, write_json


class _Exploit:
    """Unpickling this would run a command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_runs_code_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "epoch_001.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(UserError) as e:
        load_tensors(path)
    assert not marker.exists()  # the payload never ran
    assert "cannot be loaded safely" in str(e.value) and "\n" not in str(e.value)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(UserError, match="cannot write .*results.json .disk full"):  # one line, exit 2
        write_json(path, {"a": 2})
    monkeypatch.undo()
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_corrupt_json_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": ')
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(path)


def test_keep_checkpoints_needed_prunes_only_unused(tiny_argv, tmp_path):
    import gradient_accounting
    from common.rewinding import auto_rewind_epochs
    gradient_accounting.main(tiny_argv(tmp_path / "runs", epochs=12, keep_checkpoints="needed"))
    run_dir = next((tmp_path / "runs").iterdir())
    kept = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("epoch_*.pt"))
    assert kept == sorted({0, 12, *auto_rewind_epochs(12)}) and len(kept) < 13
    import layer_rewinding  # the default sweep still finds every checkpoint it needs
    out = layer_rewinding.main(tiny_argv(tmp_path / "runs", epochs=12))
    assert out["rewind_epochs"] == auto_rewind_epochs(12)


def test_sigkill_during_training_then_resume_is_exact(tiny_trained, tiny_argv, tmp_path):
    """Kill the trainer (SIGKILL) during an epoch, re-run the same command: same final weights and
    accounting as an uninterrupted run (the shared tiny run was trained by plain training, which the
    accounting trainer matches bit for bit on a CPU)."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import REPO
    _, model, _, _ = tiny_trained
    cmd = [sys.executable, str(REPO / "gradient_accounting.py")] + tiny_argv(tmp_path / "runs")
    # the shared run was trained here with torch's thread count: the same in the child (a float sum's
    # order depends on it), whatever OMP_NUM_THREADS the suite runs with
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/checkpoints/epoch_003.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = next((tmp_path / "runs").iterdir())
    assert not (run_dir / "checkpoints" / "epoch_020.pt").exists()  # really interrupted mid-training
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    final = torch.load(run_dir / "checkpoints" / "epoch_020.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v), k
    acct = read_json(run_dir / "gradient_accounting.json")
    assert [e["epoch"] for e in acct["epochs"]] == list(range(1, 21))
