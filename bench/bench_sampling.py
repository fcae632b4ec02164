"""Sampling benchmarks (not tests): ratios measured in one run on this machine.

On a CPU (the default there; the CPU rows of bench/RESULTS.md), float32 unless asked otherwise:

1. Classifier-free guidance as ONE forward of batch 2N vs two separate forwards of N.
2. DDIM-S (batched guidance) vs DDPM-1000 (batched guidance) vs the seed report's recipe
   (DDPM-1000, two forwards per step), in images/s, measured on a reduced count and
   scaled linearly to 1000 images (cost is linear in images on a CPU).

    .venv/bin/python bench/bench_sampling.py [--images 20] [--ddpm-steps 50] [--profile quick]

DDPM-1000 is timed over ``--ddpm-steps`` of its 1000 steps and scaled (each step costs the same).

On a GPU (``--device cuda``, or ``auto`` where one is present) the full run: all ``--images``
(default 1000) through ``hw2lib.ddpm.generate`` with DDPM-1000 and DDIM-S over all their steps
(batched guidance, bf16 autocast, channels_last, fixed shapes; ``--compile`` adds torch.compile), each
after a warm-up at the same shapes and timed between ``torch.cuda.synchronize()`` calls, against the
seed recipe (DDPM-1000, two forwards of N per step, float32) on the same images, timed over
``--ddpm-steps`` of its identical steps and scaled by 1000 / ``--ddpm-steps`` (the table says so).

    .venv/bin/python bench/bench_sampling.py --device cuda --profile full --ddim-steps 50 --targets

``--full-run`` / ``--no-full-run`` picks either table on any device (``--device cpu --full-run
--images 2`` checks the GPU table's code paths on a CPU); ``--bf16``, ``--channels-last`` (and their
``--no-`` forms) and ``--compile`` override the device's defaults (on for a GPU, off for a CPU; the
seed recipe row stays float32).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import platform
import time

import torch

from hw2lib import config, ddpm, samplers
from hw2lib.diffusion import schedule_from
from hw2lib.paths import describe_device, pick_device
from hw2lib.schedule import NoiseSchedule
from hw2lib.unet import build_unet, count_parameters

TARGETS = {"ddpm": 30.0, "ddim": 3.0}  # seconds for 1000 guided digits on one H200-class GPU (issue #10)


def two_forwards(model, labels, w):
    null = torch.full_like(labels, model.null_label)

    def eps(x, t):
        return (1 + w) * model(x, t, labels) - w * model(x, t, null)

    return eps


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(eps_model, n, steps, size, sampler, schedule, device="cpu", autocast=None,
               memory_format=torch.contiguous_format, warmup=False):
    device = torch.device(device)
    x = torch.randn(n, 3, size, size, device=device).contiguous(memory_format=memory_format)
    t = torch.full((n,), 500, dtype=torch.long, device=device)
    if warmup:  # compilation, cuDNN's kernel choice and the allocator, outside the timing
        with torch.inference_mode(), autocast or contextlib.nullcontext():
            eps_model(x, t)
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast or contextlib.nullcontext():
        if sampler == "ddim":
            samplers.ddim_sample(eps_model, x, schedule, steps=steps)
        else:  # a slice of DDPM-1000: `steps` of its identical steps
            for _ in range(steps):
                x = eps_model(x, t)
    synchronize(device)
    return time.perf_counter() - start


def scaled_table(args, cfg, model, fast_model, device, opts) -> None:
    """The CPU table: a reduced count and DDPM steps, scaled to 1000 images and 1000 steps."""
    schedule = schedule_from(cfg).to(device)
    n, size = args.images or 20, cfg.image_size
    labels = (torch.arange(n) % 10).to(device)
    s = args.ddim_steps or (cfg.sample_steps if cfg.sampler == "ddim" else 50)
    w = cfg.guidance
    warmup = device.type == "cuda" or opts["compile"]
    fast = dict(device=device, warmup=warmup, memory_format=opts["memory_format"])

    def ac():
        return ddpm.autocast(opts["cfg"], device)

    scale = 1000 / args.ddpm_steps
    t_two = time_steps(two_forwards(model, labels, w), n, args.ddpm_steps, size, "ddpm", schedule, device,
                       warmup=warmup) * scale
    t_one = time_steps(samplers.guided(fast_model, labels, w), n, args.ddpm_steps, size, "ddpm", schedule,
                       autocast=ac(), **fast) * scale
    t_ddim = time_steps(samplers.guided(fast_model, labels, w), n, s, size, "ddim", schedule, autocast=ac(), **fast)
    t_nog = time_steps(samplers.guided(fast_model, labels, 0.0), n, s, size, "ddim", schedule, autocast=ac(), **fast)
    rows = []
    for name, sec in [("seed recipe: DDPM-1000, two forwards/step", t_two),
                      ("DDPM-1000, batched guidance (one 2N forward)", t_one),
                      (f"DDIM-{s}, batched guidance", t_ddim), (f"DDIM-{s}, no guidance (w=0)", t_nog)]:
        rows.append((name, n / sec, sec * 1000 / n, t_two / sec))
    where = platform.processor() or platform.machine() if device.type == "cpu" else describe_device(device)
    print(f"# sampling {n} guided digits (w={w}), model {args.profile} ({count_parameters(model) / 1e6:.2f} M), "
          f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if opts["label"] != "float32":
        print(f"# all rows but the seed recipe: {opts['label']}")
    print("| recipe | images/s | s per 1000 images (scaled) | speed-up vs seed recipe |\n|---|---|---|---|")
    for name, ips, per1000, ratio in rows:
        print(f"| {name} | {ips:.2f} | {per1000:.0f} | {ratio:.1f}x |")


def timed_generate(model, cfg, labels, w, device) -> float:
    """``ddpm.generate`` of all ``labels`` after a 2-step warm-up at the same shapes, between synchronizations."""
    ddpm.generate(model, labels, dataclasses.replace(cfg, sampler="ddim", sample_steps=2), w, 0, device,
                  progress=False)
    synchronize(device)
    start = time.perf_counter()
    ddpm.generate(model, labels, cfg, w, 0, device, progress=False)
    synchronize(device)
    return time.perf_counter() - start


def full_table(args, cfg, model, fast_model, device, opts) -> None:
    """The GPU table: every image and every step measured, the seed recipe scaled over its steps."""
    n = args.images or 1000
    T = cfg.timesteps
    s = args.ddim_steps or (cfg.sample_steps if cfg.sampler == "ddim" else 50)
    w = cfg.guidance
    labels = torch.arange(n) % 10
    fast_cfg = dataclasses.replace(opts["cfg"], sample_batch=n, eta=0.0)
    plain_cfg = dataclasses.replace(fast_cfg, autocast="none", channels_last=False, compile=False)

    k = min(args.ddpm_steps, T)
    print(f"# sampling {n} guided digits (w={w}) in one batch, model {args.profile} "
          f"({count_parameters(model) / 1e6:.2f} M, untrained), {describe_device(device)}, torch {torch.__version__}")
    print(f"# every row but the first measured over all its steps after a warm-up; the seed recipe timed over {k} of "
          f"its {T} identical steps and scaled x{T / k:g}")
    print(f"| recipe | images | steps timed | seconds for {n} images | images/s | speed-up vs seed recipe |\n"
          "|---|---|---|---|---|---|")
    # the seed recipe: two float32 forwards of N per DDPM step, timed over `--ddpm-steps` of its T identical steps
    part = NoiseSchedule(schedule_from(cfg).betas[:k]).to(device)
    x_T = torch.randn(n, 3, cfg.image_size, cfg.image_size, device=device)
    seed_eps = two_forwards(model, labels.to(device), w)
    with torch.inference_mode():
        seed_eps(x_T, torch.zeros(n, dtype=torch.long, device=device))  # warm-up
        synchronize(device)
        start = time.perf_counter()
        samplers.ddpm_sample(seed_eps, x_T, part, generator=torch.Generator(device=device).manual_seed(0))
        synchronize(device)
    t_seed = (time.perf_counter() - start) * T / k

    rows = []

    def row(name, steps, sec):  # printed as soon as measured, so a run cut short still shows its rows
        rows.append(sec)
        print(f"| {name} | {n} | {steps} | {sec:.2f} | {n / sec:.2f} | {t_seed / sec:.1f}x |", flush=True)

    row(f"seed recipe: DDPM-{T}, two forwards/step, float32", f"{k} of {T}, x{T / k:g}", t_seed)
    row(f"DDPM-{T}, batched guidance, {opts['label']}", f"{T} of {T}",
        timed_generate(fast_model, dataclasses.replace(fast_cfg, sampler="ddpm"), labels, w, device))
    ddim_cfg = dataclasses.replace(fast_cfg, sampler="ddim", sample_steps=s)
    row(f"DDIM-{s}, batched guidance, {opts['label']}", f"{s} of {s}",
        timed_generate(fast_model, ddim_cfg, labels, w, device))
    if opts["label"] != "float32":  # what the options buy, on the cheap sampler
        row(f"DDIM-{s}, batched guidance, float32", f"{s} of {s}",
            timed_generate(copy.deepcopy(model), dataclasses.replace(plain_cfg, sampler="ddim", sample_steps=s),
                           labels, w, device))
    row(f"DDIM-{s}, no guidance (w=0), {opts['label']}", f"{s} of {s}",
        timed_generate(fast_model, ddim_cfg, labels, 0.0, device))
    if args.targets:
        checks = [(f"DDPM-{T}", rows[1], TARGETS["ddpm"], T == 1000), (f"DDIM-{s}", rows[2], TARGETS["ddim"], s == 50)]
        for name, sec, limit, applies in checks:
            if n != 1000 or not applies:
                print(f"target {name}: not applicable (the targets are for 1000 images with DDPM-1000 and DDIM-50)")
            else:
                print(f"target {name}, 1000 guided digits < {limit:g} s: {sec:.2f} s -> "
                      f"{'MET' if sec < limit else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None, help="default: 20 (scaled table), 1000 (full run)")
    parser.add_argument("--ddim-steps", type=int, default=None,
                        help="default: the profile's DDIM steps, 50 where its sampler is DDPM")
    parser.add_argument("--ddpm-steps", type=int, default=50,
                        help="DDPM steps timed and scaled to 1000 (all rows of the scaled table; the seed recipe "
                             "of the full run)")
    parser.add_argument("--full-run", action=argparse.BooleanOptionalAction, default=None,
                        help="time every image and step (default: on a GPU)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast of the network (default: on a GPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels_last model and inputs (default: on a GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (minutes on a CPU)")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    parser.add_argument("--targets", action="store_true",
                        help="full run: say whether 1000 digits take < 30 s (DDPM-1000) and < 3 s (DDIM-50)")
    args = parser.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        device = torch.device("cuda", torch.cuda.current_device())
    full_run = gpu if args.full_run is None else args.full_run
    bf16 = gpu if args.bf16 is None else args.bf16
    channels_last = gpu if args.channels_last is None else args.channels_last
    cfg = config.from_params("ddpm", profile=args.profile)
    fast_cfg = dataclasses.replace(cfg, autocast="bf16" if bf16 else "none", channels_last=channels_last,
                                   compile=args.compile)
    label = ", ".join([p for p, on in (("bf16 autocast", bf16), ("channels_last", channels_last),
                                       (f"torch.compile ({args.compile_mode})", args.compile)) if on]) or "float32"
    opts = {"cfg": fast_cfg, "label": label, "compile": args.compile,
            "memory_format": torch.channels_last if channels_last else torch.contiguous_format}

    torch.manual_seed(0)
    model = build_unet(cfg).eval().to(device)
    fast_model = copy.deepcopy(model)
    if channels_last or args.compile:
        fast_model = ddpm.sampling_model(fast_model, dataclasses.replace(fast_cfg, compile=False))
        if args.compile:
            fast_model.compile(dynamic=False, mode=None if args.compile_mode == "default" else args.compile_mode)
    (full_table if full_run else scaled_table)(args, cfg, model, fast_model, device, opts)


if __name__ == "__main__":
    main()
