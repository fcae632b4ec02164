"""``python -m hw2lib train PART``: train or resume, then export small weights with a manifest."""
from __future__ import annotations

import os
import shlex
import sys
import time

import torch

from . import config, paths, weights
from .diffusion import checkpoint_path


def train_command(part: str, profile: str, params: dict, max_minutes: float | None = None, export: bool = True,
                  threads: int | None = None, evaluate_per_digit: int = 20) -> int:
    if threads:
        torch.set_num_threads(threads)
    if part == "dann":
        return train_dann(profile, params)
    cfg_part = {"ddpm": "ddpm", "faces": "ddim"}[part]
    forced = {"train": True, **({"model": "faces"} if part == "faces" else {})}  # never re-export the course UNet
    cfg = config.from_params(cfg_part, profile=profile, **{**params, **forced})
    device = init_distributed(paths.pick_device(cfg.device))
    rank = int(os.environ.get("RANK", "0"))
    paths.seed_everything(cfg.seed)
    max_seconds = max_minutes * 60 if max_minutes else None
    command = "python -m hw2lib " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    start = time.perf_counter()
    if part == "ddpm":
        from . import ddpm

        model, info = ddpm.prepare_model(cfg, device, progress=True, max_seconds=max_seconds)
        data = ddpm.load_data(cfg)
        extra = {}
        if export and evaluate_per_digit > 0 and rank == 0:
            extra["accuracies"] = ddpm_accuracies(model, cfg, device, evaluate_per_digit)
    else:
        from . import ddim as faces_model

        model, info = faces_model.prepare_model(cfg, device, progress=True, max_seconds=max_seconds)
        data = faces_model.load_data(cfg)
        extra = {}
    print(f"{part}: {info.origin}, step {info.steps}/{cfg.train_steps}, {info.seconds:.0f} s of training in all; "
          f"this call took {time.perf_counter() - start:.0f} s")
    if not export or rank != 0:  # only rank 0 writes
        return 0
    manifest = {
        "command": command, "profile": profile, "steps": info.steps, "train_steps": cfg.train_steps,
        "finished": info.steps >= cfg.train_steps, "images_seen": info.steps * cfg.batch_size,
        "seconds": round(info.seconds, 1), "device": paths.describe_device(device),
        "data": {"source": data.source if hasattr(data, "source") else data.manifest.get("source"),
                 "checksum": data.manifest.get("checksum")},
        "checkpoint": str(checkpoint_path(cfg_part, cfg).relative_to(paths.repo_root()))
        if checkpoint_path(cfg_part, cfg).is_relative_to(paths.repo_root()) else str(checkpoint_path(cfg_part, cfg)),
        "history": info.history, **extra,
    }
    name = f"{part}_{profile}"
    path = weights.export_weights(name, model, cfg, cfg_part, manifest)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {path.with_suffix('.json').name}")
    return 0


def train_dann(profile: str, params: dict) -> int:
    """Train (or resume) the six DANN models of ``profile`` into ``checkpoints/``, where notebooks/03_dann.ipynb
    and ``dann-predict`` find them; under ``torchrun`` every rank trains its slice and rank 0 writes."""
    import torch.distributed as dist

    from . import dann

    cfg = config.from_params("dann", profile=profile, **params)
    device = init_distributed(paths.pick_device(cfg.device))
    rank = int(os.environ.get("RANK", "0"))
    paths.seed_everything(cfg.seed)
    if rank != 0 and dist.is_initialized():
        dist.barrier()  # rank 0 builds the offline data first; the others then read its cache
    data = dann.load_data(cfg)
    if rank == 0 and dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    results = dann.train_all(cfg, data, device, save=True, progress=True)
    if rank == 0:
        rows, columns = dann.accuracy_rows(results)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in columns))
        print(f"dann: {time.perf_counter() - start:.0f} s on {paths.describe_device(device)}; checkpoints in "
              f"{paths.checkpoints_dir()}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def ddpm_accuracies(model, cfg, device, per_digit: int) -> dict:
    from . import ddpm, evaluate

    labels = ddpm.digit_labels(per_digit)
    judges = ddpm.judges(cfg, device)
    out = {"per_digit": per_digit, "sampler": cfg.sampler, "steps": cfg.sample_steps}
    for w in (0.0, cfg.guidance):
        images, seconds = ddpm.generate(model, labels, cfg, w, cfg.seed, device)
        for judge, net in judges.items():
            acc, correct, total = evaluate.accuracy(net, images, labels)
            out[f"w={w} {judge}"] = round(acc, 4)
        out[f"w={w} seconds"] = round(seconds, 1)
    print("accuracies:", out)
    return out


def init_distributed(device):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs).

    The global batch stays ``cfg.batch_size`` whatever the number of processes, each rank
    taking its slice of one batch drawn identically everywhere, so a run can resume with
    another number of processes.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return device
