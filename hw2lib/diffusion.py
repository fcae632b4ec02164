"""Forward noising, the training loss with label dropout, and the resumable training loop.

The loop draws everything random (batch indices, timesteps, noise, label dropout)
from one ``torch.Generator`` whose state is checkpointed with the model, the EMA,
the optimiser and the step, so that on a CPU a run interrupted and resumed ends
with exactly the weights of an uninterrupted run.  Checkpoints are written
atomically; a non-finite loss stops training at once, naming the step, and the last
good checkpoint stays the newest.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint
from .config import as_dict, model_keys
from .schedule import NoiseSchedule


class TrainingDiverged(RuntimeError):
    pass


def schedule_from(cfg) -> NoiseSchedule:
    return NoiseSchedule.linear(cfg.timesteps, cfg.beta_start, cfg.beta_end)


def draw_batch(n_images: int, batch_size: int, timesteps: int, image_shape: tuple, p_uncond: float,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Everything random about one (global) training batch, in a fixed order from one generator:
    image indices, timesteps, noise and the label-dropout mask."""
    idx = torch.randint(0, n_images, (batch_size,), generator=generator)
    t = torch.randint(0, timesteps, (batch_size,), generator=generator)
    noise = torch.randn((batch_size, *image_shape), generator=generator)
    drop = torch.rand((batch_size,), generator=generator) < p_uncond if p_uncond > 0 else None
    return {"idx": idx, "t": t, "noise": noise, "drop": drop}


def stage_data(images: torch.Tensor, labels: torch.Tensor | None, device,
               max_fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Where the training loop gathers its batches from.

    The data are in-memory tensors (no loader, so no loader workers): on a CUDA device they are moved to
    the GPU once when they take at most ``max_fraction`` of its free memory (the digits: 0.56 GB), so a
    step gathers its batch there; otherwise, and on a CPU, they stay where they are and each gathered
    batch goes over through pinned memory (``to_device``).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return images, labels
    free, _ = torch.cuda.mem_get_info(device)
    size = images.numel() * images.element_size() + (labels.numel() * labels.element_size() if labels is not None
                                                     else 0)
    if size > max_fraction * free:
        return images, labels
    return images.to(device), (labels.to(device) if labels is not None else None)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for a GPU goes through pinned memory without blocking."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, labels: torch.Tensor | None,
                   t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor | None = None,
                   null_label: int | None = None, min_snr_gamma: float | None = None):
    """Noise-prediction MSE at the drawn t; labels replaced by the null label where ``drop``;
    optional min-SNR-gamma weighting (Hang et al. 2023)."""
    x_t = schedule.q_sample(x0, t, noise)
    if labels is not None:
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, null_label), labels)
        pred = model(x_t, t, labels)
    else:
        pred = model(x_t, t)
    per_sample = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
    if min_snr_gamma:
        snr = schedule.snr(t.cpu()).to(x0.device)
        weight = (snr.clamp(max=min_snr_gamma) / snr).to(per_sample.dtype)
        return (weight * per_sample).mean()
    return per_sample.mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters and float buffers."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def world_info() -> tuple[int, int]:
    """(world size, rank) under torch.distributed, else (1, 0)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def learning_rate(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_tag(part: str, cfg) -> str:
    """A short hash of the config keys that define a run, so differing configs never share a checkpoint."""
    keys = {k: as_dict(cfg)[k] for k in model_keys(part)}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema: torch.nn.Module
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Path | None = None
    resumed_from: int = 0


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, cfg, part: str,
          ckpt_path: Path | None, device, progress: bool = True, max_seconds: float | None = None,
          stop_after: int | None = None, log_every: int = 10) -> TrainResult:
    """Train (or resume) to ``cfg.train_steps``; checkpoint every ``cfg.checkpoint_every`` steps.

    ``stop_after`` ends the run after that many steps in total (tests simulate an interruption
    with it); ``max_seconds`` ends it after that much wall-clock time, saving a checkpoint.
    """
    from tqdm.auto import tqdm

    schedule = schedule_from(cfg)
    device = torch.device(device)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=getattr(cfg, "weight_decay", 0.0))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history, seconds, resumed_from = 0, [], 0.0, 0
    config = as_dict(cfg)
    if ckpt_path is not None and Path(ckpt_path).parent.is_dir():  # leftovers of a save killed mid-write
        for stale in Path(ckpt_path).parent.glob(f".{Path(ckpt_path).name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if ckpt_path is not None and Path(ckpt_path).is_file():
        state = checkpoint.load(ckpt_path, expect_config=config, keys=model_keys(part))
        checkpoint.load_state_dict_strict(model, state["model"], ckpt_path)
        checkpoint.load_state_dict_strict(ema, state["ema"], ckpt_path)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, history, seconds = int(state["step"]), list(state.get("history", [])), float(state.get("seconds", 0))
        resumed_from = step
    total = cfg.train_steps
    end = min(total, stop_after) if stop_after is not None else total
    n = len(images)
    images, labels = stage_data(images, labels, device)
    start = time.perf_counter()
    running = 0.0
    bar = tqdm(total=total, initial=step, desc=f"training {part}", disable=not progress or world_info()[1] != 0,
               dynamic_ncols=True)

    def save() -> None:
        if ckpt_path is None or rank != 0:  # only rank 0 writes
            return
        checkpoint.save(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                    "optimizer": opt.state_dict(), "generator": gen.get_state(),
                                    "history": history, "seconds": seconds + time.perf_counter() - start},
                        config=config, step=step)

    world, rank = world_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    while step < end:
        lr = learning_rate(step, cfg.lr, cfg.warmup_steps, total)
        for group in opt.param_groups:
            group["lr"] = lr
        # the global batch is drawn identically on every rank; each rank takes its slice
        b = draw_batch(n, cfg.batch_size, schedule.T, tuple(images.shape[1:]), getattr(cfg, "p_uncond", 0.0), gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        idx = b["idx"][mine]
        x0 = to_device(images[to_device(idx, images.device)], device)
        y = to_device(labels[to_device(idx, labels.device)], device) if labels is not None else None
        drop = to_device(b["drop"][mine], device) if b["drop"] is not None else None
        loss = diffusion_loss(net, schedule, x0, y, to_device(b["t"][mine], device),
                              to_device(b["noise"][mine], device), drop, getattr(model, "null_label", None),
                              cfg.min_snr_gamma)
        if world > 1:  # the logged loss and the NaN check see the global batch
            loss_all = loss.detach().clone()
            dist.all_reduce(loss_all)
            loss_value = loss_all / world
        else:
            loss_value = loss.detach()
        if not torch.isfinite(loss_value):
            bar.close()
            raise TrainingDiverged(
                f"{part} training stopped: loss became {loss_value.item()} at step {step + 1}; "
                f"the last good checkpoint ({ckpt_path}) is kept as it was"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema, model, decay)
        step += 1
        running += loss_value.item()
        if step % log_every == 0 or step == end:
            k = log_every if step % log_every == 0 else step % log_every
            history.append({"step": step, "loss": running / k, "lr": lr,
                            "seconds": round(seconds + time.perf_counter() - start, 2)})
            bar.set_postfix(loss=f"{running / k:.4f}")
            running = 0.0
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == end:
            save()
        if max_seconds is not None and _stop_all(time.perf_counter() - start > max_seconds, world, device):
            save()
            break
    bar.close()
    seconds += time.perf_counter() - start
    model.eval()
    return TrainResult(model, ema, step, history, seconds, ckpt_path, resumed_from)


def checkpoint_path(part: str, cfg) -> Path:
    from . import paths

    return paths.checkpoints_dir() / f"{part}_{cfg.profile}_{run_tag(part, cfg)}" / "latest.pt"


def _stop_all(stop: bool, world: int, device) -> bool:
    """A stop decision every rank agrees on (rank 0's clock decides)."""
    if world == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())
