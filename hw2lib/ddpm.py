"""The DDPM part's glue: data, model (shipped weights, resume or train), generation, evaluation.

Notebook ``01_ddpm`` and the command line (``train ddpm``, ``ddpm-generate``) call these.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, digits, evaluate, paths, samplers
from .diffusion import checkpoint_path, schedule_from, train
from .plots import to_uint8_images
from .unet import build_unet

WEIGHTS_NAME = "ddpm_{profile}"


def load_data(cfg) -> digits.DigitDataset:
    return digits.load_domain(cfg.domain, "train", source=cfg.data_source, data_root=cfg.data_root)


@dataclass
class ModelInfo:
    origin: str  # "shipped weights weights/ddpm_quick.pt" | "trained ..." | "resumed ..."
    steps: int
    seconds: float
    history: list
    manifest: dict[str, Any] | None = None


def shipped_weights_name(cfg) -> str:
    return WEIGHTS_NAME.format(profile=cfg.profile)


def prepare_model(cfg, device, progress: bool = True, max_seconds: float | None = None):
    """The EMA model to sample from: shipped weights unless ``cfg.train``; else resume or train."""
    from . import weights

    model = build_unet(cfg)
    name = shipped_weights_name(cfg)
    if not cfg.train:
        if not weights.weights_path(name).is_file():
            raise FileNotFoundError(
                f"no shipped weights {weights.weights_path(name)} for profile {cfg.profile!r}; "
                f"pass train=True (TRAIN=1) to train, or run `python -m hw2lib train ddpm --profile {cfg.profile}`")
        manifest = weights.load_weights(name, model, cfg, "ddpm")
        info = ModelInfo(f"shipped weights weights/{name}.pt", manifest.get("steps", 0), manifest.get("seconds", 0.0),
                         manifest.get("history", []), manifest)
        return model.to(device).eval(), info
    data = load_data(cfg)
    x, y = data.tensors()
    ckpt = checkpoint_path("ddpm", cfg)
    result = train(model, x, y, cfg, "ddpm", ckpt, device, progress=progress, max_seconds=max_seconds)
    how = f"resumed from step {result.resumed_from}" if result.resumed_from else "from scratch"
    origin = f"trained here ({how})"
    return result.ema.to(device).eval(), ModelInfo(origin, result.step, result.seconds, result.history)


def generate(model, labels: torch.Tensor, cfg, w: float, seed: int, device, callback=None,
             progress: bool = True, desc: str = "sampling") -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] for ``labels``, in batches of ``cfg.sample_batch``; returns (images, seconds)."""
    from tqdm.auto import tqdm

    schedule = schedule_from(cfg)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (3, cfg.image_size, cfg.image_size)
    out = []
    start = time.perf_counter()
    batches = list(torch.split(labels, cfg.sample_batch))
    steps = cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    bar = tqdm(total=len(batches) * steps, desc=f"{desc} (w={w})", disable=not progress, leave=False)
    for b, lab in enumerate(batches):
        x_T = torch.randn((len(lab), *shape), generator=gen).to(device)
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1 + b)

        def step_cb(i, t, x, b=b):
            bar.update(1)
            if callback is not None:
                callback(b, i, t, x)

        with torch.inference_mode():
            x0 = samplers.sample(samplers.guided(model, lab.to(device), w), x_T, schedule, cfg.sampler,
                                 cfg.sample_steps, cfg.eta, "ermon", generator=noise_gen, callback=step_cb)
        out.append(x0.clamp(-1, 1).cpu())
    bar.close()
    return torch.cat(out), time.perf_counter() - start


def digit_labels(n_per_digit: int) -> torch.Tensor:
    return torch.arange(10).repeat_interleave(n_per_digit)


def reverse_process(model, cfg, device, seed: int, n_frames: int = 8) -> tuple[np.ndarray, list[int]]:
    """x_t of the first generated "0" at ``n_frames`` timesteps from pure noise to x_0 (uint8 frames)."""
    schedule = schedule_from(cfg)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((1, 3, cfg.image_size, cfg.image_size), generator=gen).to(device)
    frames, ts = [x_T.cpu()], [cfg.timesteps]
    total = cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    keep = set(np.linspace(0, total - 1, n_frames - 1).round().astype(int).tolist())

    def cb(i, t, x):
        if i in keep:
            frames.append(x.cpu())
            ts.append(t)

    with torch.inference_mode():
        samplers.sample(samplers.guided(model, torch.zeros(1, dtype=torch.long, device=device), cfg.guidance), x_T,
                        schedule, cfg.sampler, cfg.sample_steps, cfg.eta, "ermon",
                        generator=torch.Generator(device=device).manual_seed(seed + 1), callback=cb)
    return to_uint8_images(torch.cat(frames).clamp(-1, 1)), ts


def evaluator(cfg, device, progress: bool = True) -> torch.nn.Module:
    """The project's digit classifier for ``cfg.domain``, trained once on its training split and cached."""
    data = load_data(cfg)
    key = data.manifest.get("checksum", "nochecksum")[:12]
    path = paths.checkpoints_dir() / f"evaluator_{cfg.domain}_{data.source}_{key}_e{cfg.evaluator_epochs}.pt"
    model = evaluate.DigitClassifier()
    if path.is_file():
        state = checkpoint.load(path)
        checkpoint.load_state_dict_strict(model, state["model"], path)
        return model.to(device).eval()
    x, y = data.tensors()
    model = evaluate.train_evaluator(x, y, epochs=cfg.evaluator_epochs, seed=cfg.seed, device=device,
                                     progress=progress)
    checkpoint.save(path, {"model": model.state_dict()}, config={"domain": cfg.domain, "source": data.source})
    return model.eval()


def judges(cfg, device, progress: bool = True) -> dict[str, torch.nn.Module]:
    """The project's evaluator, plus the course grader when its file is present."""
    out = {"project evaluator": evaluator(cfg, device, progress)}
    grader = evaluate.default_grader_path()
    if grader is not None:
        out["course grader"] = evaluate.load_course_grader(grader, device)
    return out


def write_course_folder(images: np.ndarray, labels: np.ndarray, out_dir: str | os.PathLike,
                        overwrite: bool = False) -> Path:
    """Write ``{digit}_{index:03d}.png`` (index from 1 per digit) as the course grader reads them.

    Written into a temporary folder beside ``out_dir`` and renamed when complete, so an
    interrupted run never leaves a half-written folder that looks finished.  An existing
    non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        counts: dict[int, int] = {}
        for img, label in zip(images, labels):
            label = int(label)
            counts[label] = counts.get(label, 0) + 1
            Image.fromarray(img).save(tmp / f"{label}_{counts[label]:03d}.png")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
