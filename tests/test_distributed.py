"""DDPM training under torchrun with gloo on the CPU: 2 processes, identical weights, falling loss,
and resume across a change of the number of processes."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Each torchrun script: PROLOGUE (arguments OUT TOTAL STOP, the process group, `rank`), a body that trains
# `r` (with .model and .history), EPILOGUE (each rank saves rank<N>.pt to OUT).
PROLOGUE = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from hw2lib import config
    out, total, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
''')
EPILOGUE = textwrap.dedent('''
    torch.save({"model": r.model.state_dict(), "history": r.history}, os.path.join(out, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.destroy_process_group()
''')

SCRIPT = PROLOGUE + textwrap.dedent('''
    from hw2lib import diffusion
    from hw2lib.unet import build_unet
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (128,), generator=g)
    x = (y.float() / 9 * 2 - 1)[:, None, None, None].expand(-1, 3, 28, 28).contiguous()
    cfg = config.from_params("ddpm", profile="smoke", train_steps=total, batch_size=16, lr=3e-3, warmup_steps=2,
                             checkpoint_every=4)
    torch.manual_seed(rank)  # different initialisations: DDP must broadcast rank 0's
    r = diffusion.train(build_unet(cfg), x, y, cfg, "ddpm", os.path.join(out, "ckpt.pt"), "cpu", progress=False,
                        stop_after=stop, log_every=2)
''') + EPILOGUE


def _launch(tmp_path, nproc, out, steps, stop, source=None):
    """torchrun ``source`` (default: the DDPM script) with ``nproc`` processes: OUT TOTAL STOP as its arguments."""
    script = tmp_path / "train_ddp.py"
    script.write_text(source or SCRIPT)
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           str(out), str(steps), str(stop)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_gloo_identical_weights_loss_falls_and_resume_across_n(tmp_path):
    two = tmp_path / "two"
    _launch(tmp_path, 2, two, 24, 24)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    losses = [h["loss"] for h in r0["history"]]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert (two / "ckpt.pt").is_file()

    # 2 processes to step 8, then 1 process to step 24 == 2 processes all the way (global batch is the same)
    mixed = tmp_path / "mixed"
    _launch(tmp_path, 2, mixed, 24, 8)
    _launch(tmp_path, 1, mixed, 24, 24)
    resumed = torch.load(mixed / "rank0.pt", weights_only=True)["model"]
    for k, v in r0["model"].items():
        assert torch.allclose(v, resumed[k], atol=1e-4, rtol=1e-3), k


DANN_SCRIPT = PROLOGUE + textwrap.dedent('''
    from hw2lib import dann

    def toy(n, domain, seed):  # class c: a bright square at one of 10 places; the target darker and tinted
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 10
        x = torch.full((n, 3, 28, 28), -0.8) + 0.1 * torch.randn(n, 3, 28, 28, generator=g)
        for i, c in enumerate(y.tolist()):
            x[i, :, 2 + 12 * (c // 5):8 + 12 * (c // 5), 1 + 5 * (c % 5):7 + 5 * (c % 5)] += 1.5
        if domain:
            x = 0.6 * x + 0.3 * torch.randn(n, 3, 28, 28, generator=g)
            x[:, 0] += 0.4
        return dann.Split("usps" if domain else "mnistm", "x", x.clamp(-1, 1), y, "toy")

    data = {"mnistm": {"train": toy(192, 0, 1), "val": toy(60, 0, 2)},
            "usps": {"train": toy(128, 1, 3), "val": toy(60, 1, 4)}}
    cfg = config.from_params("dann", profile="smoke", targets=("usps",), epochs=total, batch_size=32, lr=5e-3,
                             dropout=0.0)
    r = dann.train("dann", cfg, data, "usps", ckpt=os.path.join(out, "dann.pt"), progress=False,
                   log=lambda *a: None, stop_after=stop)
''') + EPILOGUE


@pytest.mark.slow
def test_dann_two_processes_gloo_identical_weights_loss_falls_and_resume_across_n(tmp_path):
    def launch(nproc, out, stop):  # 4 epochs in all, this call stopping after `stop`
        _launch(tmp_path, nproc, out, 4, stop, source=DANN_SCRIPT)

    two = tmp_path / "two"
    launch(2, two, 4)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    hist = r0["history"]
    assert len(hist) == 4
    assert hist[-1]["label_loss"] < 0.7 * hist[0]["label_loss"]
    # the history counts both ranks' images: 6 steps of 32 source images per epoch (192 / 32)
    assert hist[0]["label_acc"] * 192 == pytest.approx(round(hist[0]["label_acc"] * 192))
    assert all(0.0 <= h["domain_acc"] <= 1.0 for h in hist)
    assert (two / "dann.pt").is_file()

    # 2 processes for 1 epoch, then 1 process to epoch 4 == 2 processes all the way (same global batches)
    mixed = tmp_path / "mixed"
    launch(2, mixed, 1)
    assert [h["epoch"] for h in torch.load(mixed / "rank0.pt", weights_only=True)["history"]] == [1]
    launch(1, mixed, 4)
    resumed = torch.load(mixed / "rank0.pt", weights_only=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    for k, v in r0["model"].items():
        assert torch.allclose(v, resumed["model"][k], atol=1e-4, rtol=1e-3), k
