"""Sampling benchmarks (not tests): ratios measured in one run on this machine.

1. Classifier-free guidance as ONE forward of batch 2N vs two separate forwards of N.
2. DDIM-S (batched guidance) vs DDPM-1000 (batched guidance) vs the seed report's recipe
   (DDPM-1000, two forwards per step), in images/s, measured on a reduced count and
   scaled linearly to 1000 images (cost is linear in images on a CPU).

    .venv/bin/python bench/bench_sampling.py [--images 20] [--ddpm-steps 50] [--profile quick]

DDPM-1000 is timed over ``--ddpm-steps`` of its 1000 steps and scaled (each step costs the same).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from hw2lib import config, samplers
from hw2lib.diffusion import schedule_from
from hw2lib.unet import build_unet, count_parameters


def two_forwards(model, labels, w):
    null = torch.full_like(labels, model.null_label)

    def eps(x, t):
        return (1 + w) * model(x, t, labels) - w * model(x, t, null)

    return eps


def time_steps(eps_model, n, steps, size, sampler, schedule):
    x = torch.randn(n, 3, size, size)
    start = time.perf_counter()
    with torch.inference_mode():
        if sampler == "ddim":
            samplers.ddim_sample(eps_model, x, schedule, steps=steps)
        else:  # a slice of DDPM-1000: `steps` of its identical steps
            t = torch.full((n,), 500, dtype=torch.long)
            for _ in range(steps):
                x = eps_model(x, t)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--ddim-steps", type=int, default=None)
    parser.add_argument("--ddpm-steps", type=int, default=50)
    args = parser.parse_args()
    cfg = config.from_params("ddpm", profile=args.profile)
    model = build_unet(cfg).eval()
    schedule = schedule_from(cfg)
    n, size = args.images, cfg.image_size
    labels = torch.arange(n) % 10
    s = args.ddim_steps or cfg.sample_steps
    w = cfg.guidance
    rows = []
    scale = 1000 / args.ddpm_steps
    t_two = time_steps(two_forwards(model, labels, w), n, args.ddpm_steps, size, "ddpm", schedule) * scale
    t_one = time_steps(samplers.guided(model, labels, w), n, args.ddpm_steps, size, "ddpm", schedule) * scale
    t_ddim = time_steps(samplers.guided(model, labels, w), n, s, size, "ddim", schedule)
    t_nog = time_steps(samplers.guided(model, labels, 0.0), n, s, size, "ddim", schedule)
    for name, sec in [("seed recipe: DDPM-1000, two forwards/step", t_two),
                      ("DDPM-1000, batched guidance (one 2N forward)", t_one),
                      (f"DDIM-{s}, batched guidance", t_ddim), (f"DDIM-{s}, no guidance (w=0)", t_nog)]:
        rows.append((name, n / sec, sec * 1000 / n, t_two / sec))
    print(f"# sampling {n} guided digits (w={w}), model {args.profile} ({count_parameters(model) / 1e6:.2f} M), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| recipe | images/s | s per 1000 images (scaled) | speed-up vs seed recipe |\n|---|---|---|---|")
    for name, ips, per1000, ratio in rows:
        print(f"| {name} | {ips:.2f} | {per1000:.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
