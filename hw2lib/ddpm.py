"""The DDPM part's glue: data, model (shipped weights, resume or train), generation, evaluation.

Notebook ``01_ddpm`` and the command line (``train ddpm``, ``ddpm-generate``) call these.
"""
from __future__ import annotations

import os
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
             progress: bool = True, desc: str = "sampling",
             fixed_shapes: bool | None = None) -> tuple[torch.Tensor, float]:
    """Images in [-1, 1] for ``labels``, in batches of ``cfg.sample_batch``; returns (images, seconds).

    The GPU fast path, each part asked for by the config (the ``full`` profile asks for the first two):
    ``cfg.autocast == "bf16"`` runs the network under bfloat16 autocast, ``cfg.channels_last`` converts
    the model (in place; the values are unchanged) and x_t to channels_last, ``cfg.compile`` compiles the
    model once (in place, ``nn.Module.compile``).  ``fixed_shapes`` (default: on CUDA or when compiling)
    pads the last batch up to the size of the first with zero noise and label 0, so that every forward of
    a run has the same shape (no recompilation, CUDA-graph friendly); the padding is dropped from the
    output and from what ``callback`` sees.  Each batch draws its x_T before any padding, so x_T of the
    real images does not depend on it; with the DDPM sampler the fresh noise of a padded last batch is
    drawn for the padded shape (other images than unpadded, from the same distribution).  On CUDA the
    noise schedule is moved to the GPU once and cuDNN picks its fastest kernels for the fixed shape.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    net = sampling_model(model, cfg)
    memory_format = torch.channels_last if getattr(cfg, "channels_last", False) else torch.contiguous_format
    pad = (device.type == "cuda" or getattr(cfg, "compile", False)) if fixed_shapes is None else fixed_shapes
    schedule = schedule_from(cfg)
    if device.type != "cpu":
        schedule = schedule.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (3, cfg.image_size, cfg.image_size)
    out = []
    start = time.perf_counter()
    batches = list(torch.split(labels, cfg.sample_batch))
    batch = len(batches[0]) if batches else 0
    steps = cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps
    bar = tqdm(total=len(batches) * steps, desc=f"{desc} (w={w})", disable=not progress, leave=False)
    benchmark = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = benchmark or device.type == "cuda"
        for b, lab in enumerate(batches):
            n = len(lab)
            x_T = torch.randn((n, *shape), generator=gen)
            if pad and n < batch:
                x_T = torch.cat([x_T, x_T.new_zeros((batch - n, *shape))])
                lab = torch.cat([lab, lab.new_zeros(batch - n)])
            x_T = x_T.to(device).contiguous(memory_format=memory_format)
            noise_gen = torch.Generator(device=device).manual_seed(seed + 1 + b)

            def step_cb(i, t, x, b=b, n=n):
                bar.update(1)
                if callback is not None:
                    callback(b, i, t, x[:n])

            with torch.inference_mode(), autocast(cfg, device):
                x0 = samplers.sample(samplers.guided(net, lab.to(device), w), x_T, schedule, cfg.sampler,
                                     cfg.sample_steps, cfg.eta, "ermon", generator=noise_gen, callback=step_cb)
            out.append(x0[:n].clamp(-1, 1).contiguous().cpu())
    finally:
        torch.backends.cudnn.benchmark = benchmark
        bar.close()
    return torch.cat(out), time.perf_counter() - start


def sampling_model(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """``model`` as ``generate`` runs it: converted to channels_last in place when ``cfg.channels_last``,
    compiled in place once (``nn.Module.compile``, shapes static) when ``cfg.compile``."""
    channels_last, compile_ = getattr(cfg, "channels_last", False), getattr(cfg, "compile", False)
    for key, value in (("channels_last", channels_last), ("compile", compile_)):
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_ and getattr(model, "_compiled_call_impl", None) is None:
        model.compile(dynamic=False)
    return model


def autocast(cfg, device):
    """bfloat16 autocast of the network's forward when ``cfg.autocast == "bf16"`` (the sampler's
    arithmetic stays float32: the model output is cast back by the guidance combination)."""
    if cfg.autocast not in ("none", "bf16"):
        raise ValueError(f"autocast must be 'none' or 'bf16', got {cfg.autocast!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16")


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
    cap = cfg.evaluator_max_train
    path = paths.checkpoints_dir() / f"evaluator_{cfg.domain}_{data.source}_{key}_e{cfg.evaluator_epochs}_n{cap}.pt"
    model = evaluate.DigitClassifier()
    if path.is_file():
        state = checkpoint.load(path)
        checkpoint.load_state_dict_strict(model, state["model"], path)
        return model.to(device).eval()
    x, y = data.tensors()
    if cap is not None:
        x, y = x[:cap], y[:cap]
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
    counts: dict[int, int] = {}
    names = []
    for label in labels:
        counts[int(label)] = counts.get(int(label), 0) + 1
        names.append(f"{int(label)}_{counts[int(label)]:03d}.png")
    return checkpoint.write_image_folder(images, names, out_dir, overwrite=overwrite)


def judge_samples(images: torch.Tensor, labels: torch.Tensor, judges: dict[str, torch.nn.Module]) -> dict[str, Any]:
    """Accuracy (fraction, correct, total) of each judge on generated images."""
    out = {}
    for name, net in judges.items():
        acc, correct, total = evaluate.accuracy(net, images, labels)
        out[name] = {"accuracy": acc, "correct": correct, "total": total}
    return out


def accuracy_rows(results: dict[float, dict[str, Any]], cfg, device, data_source: str) -> list[dict[str, Any]]:
    """One table row per guidance weight: accuracy by each judge, sampler, steps, seconds, images/s."""
    from .paths import describe_device

    rows = []
    for w, r in results.items():
        row = {"guidance w": w}
        for judge, a in r["judged"].items():
            row[judge] = f"{a['accuracy']:.4f} ({a['correct']}/{a['total']})"
        n = r["n"]
        row.update({"sampler": f"{cfg.sampler}-{cfg.timesteps if cfg.sampler == 'ddpm' else cfg.sample_steps}",
                    "forwards/step": 1 if w == 0 else "1 (batch 2N)", "images": n,
                    "seconds": round(r["seconds"], 1), "images/s": round(n / r["seconds"], 2),
                    "device": describe_device(device), "data": data_source})
        rows.append(row)
    return rows


def guidance_sweep(model, cfg, judges, device, reuse: dict[float, dict[str, Any]] | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Accuracy and seconds per 1000 images for each w in ``cfg.guidance_sweep`` (reusing finished runs)."""
    rows = []
    labels = digit_labels(cfg.sweep_per_digit)
    for w in cfg.guidance_sweep:
        if reuse and w in reuse:
            r = reuse[w]
        else:
            images, seconds = generate(model, labels, cfg, w, cfg.seed + 7, device, progress=progress,
                                       desc="guidance sweep")
            r = {"judged": judge_samples(images, labels, judges), "seconds": seconds, "n": len(labels)}
        row = {"w": w, "seconds per 1000": round(r["seconds"] * 1000 / r["n"], 1), "images": r["n"]}
        row.update({judge: round(a["accuracy"], 4) for judge, a in r["judged"].items()})
        rows.append(row)
    return rows


def sweep_figure(rows: list[dict[str, Any]], judges: list[str], title: str):
    import matplotlib.pyplot as plt

    ws = [r["w"] for r in rows]
    fig, ax1 = plt.subplots(figsize=(5.8, 3.6))
    for judge in judges:
        ax1.plot(ws, [r[judge] for r in rows], marker="o", label=f"accuracy ({judge})")
    ax1.set_xlabel("guidance weight w")
    ax1.set_ylabel("accuracy")
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax2 = ax1.twinx()
    ax2.plot(ws, [r["seconds per 1000"] for r in rows], color="grey", ls="--", marker="s", label="s / 1000 images")
    ax2.set_ylabel("seconds per 1000 images")
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    ax1.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def loss_figure(history: list[dict[str, Any]], title: str):
    from .plots import line_plot

    steps = [h["step"] for h in history]
    return line_plot(steps, {"training loss (min-SNR weighted MSE)": [h["loss"] for h in history]},
                     "step", "loss", title=title, logy=True)


def add_cli(sub) -> None:
    p = sub.add_parser("ddpm-generate", help="write 1000 generated digits as the course grader reads them",
                       description="Generate 100 digits per class with classifier-free guidance and write "
                                   "{digit}_{index:03d}.png (index 1..100) into OUT_DIR.")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", default=None,
                   help="a training checkpoint (checkpoints/ddpm_*/latest.pt) or shipped weights file; "
                        "default: weights/ddpm_<profile>.pt")
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "full"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=_cmd_generate)


def load_model_file(path: str | os.PathLike, cfg) -> torch.nn.Module:
    """A UNet from a training checkpoint (its EMA) or a shipped weights file, config checked."""
    from .config import as_dict, model_keys

    path = Path(path)
    state = checkpoint.load(path)
    stored = state.get("config") or {}
    keys = [k for k in model_keys("ddpm") if k in ("image_size", "base_channels", "channel_mults",
                                                   "attn_resolutions", "time_dim", "num_classes")]
    checkpoint.check_config(path, stored, as_dict(cfg), keys)
    model = build_unet(cfg)
    weights = state.get("ema") or state.get("model")
    if weights is None:
        raise checkpoint.CheckpointError(f"{path} holds neither 'ema' nor 'model' weights")
    ref = model.state_dict()
    weights = {k: (v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v) for k, v in weights.items()}
    checkpoint.load_state_dict_strict(model, weights, path)
    return model.eval()


def _cmd_generate(args) -> int:
    import sys

    from . import config, weights

    cfg = config.from_params("ddpm", profile=args.profile, seed=args.seed, guidance=args.guidance,
                             device=args.device)
    device = paths.pick_device(cfg.device)
    path = Path(args.checkpoint) if args.checkpoint else weights.weights_path(shipped_weights_name(cfg))
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: output folder {out} exists and is not empty; choose another or pass --overwrite",
              file=sys.stderr)
        return 1
    try:
        model = load_model_file(path, cfg).to(device)
    except (checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    labels = digit_labels(100)
    images, seconds = generate(model, labels, cfg, cfg.guidance, cfg.seed, device)
    write_course_folder(to_uint8_images(images), labels.numpy(), out, overwrite=args.overwrite)
    print(f"wrote 1000 digits to {out} in {seconds:.1f} s ({cfg.sampler}, w={cfg.guidance})")
    return 0
