import os

import pytest
import torch

from hw2lib import checkpoint
from hw2lib.checkpoint import CheckpointError


def _payload():
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"step": 1, "loss": 0.5}]}


def test_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload(), config={"lr": 0.1, "width": 8}, step=7)
    data = checkpoint.load(path, expect_config={"lr": 0.1, "width": 8})
    assert torch.equal(data["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert data["step"] == 7 and data["config"] == {"lr": 0.1, "width": 8}
    assert "torch" in data["versions"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_refuses_other_config_naming_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload(), config={"lr": 0.1, "width": 8, "seed": 0})
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path, expect_config={"lr": 0.1, "width": 16, "seed": 1}, keys=["lr", "width", "seed"])
    msg = str(err.value)
    assert "width" in msg and "seed" in msg and "lr:" not in msg and str(path) in msg
    # only the listed keys matter
    checkpoint.load(path, expect_config={"lr": 0.1, "width": 16}, keys=["lr"])


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload(), config={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"not a checkpoint at all"])
def test_empty_and_random_bytes(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(target))}, path)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refused"):
        checkpoint.load(path)
    assert not target.exists()


def test_crash_while_saving_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, _payload(), config={"v": 1}, step=1)
    before = path.read_bytes()

    real_fsync = os.fsync

    def failing_fsync(fd):
        real_fsync(fd)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"model": {"w": torch.zeros(3)}}, config={"v": 2}, step=2)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_state_dict_mismatch_lists_keys(tmp_path):
    module = torch.nn.Linear(2, 3)
    state = dict(module.state_dict())
    state.pop("bias")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_state_dict_strict(module, state, tmp_path / "x.pt")
    msg = str(err.value)
    assert "missing keys [bias]" in msg and "extra.weight" in msg and "x.pt" in msg


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
