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
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    monkeypatch.undo()
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left behind


def test_corrupt_json_is_a_clear_error(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": ')
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(path)
