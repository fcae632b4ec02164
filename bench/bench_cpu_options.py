"""Inference options and training throughput on this CPU (not a test; ratios within one run).

    .venv/bin/python bench/bench_cpu_options.py [--batch 200] [--compile]

* Inference of the quick digit UNet: plain no_grad vs inference_mode vs channels_last vs bf16
  autocast (vs torch.compile with --compile, its compile time reported separately).
* Training throughput (images/s) of the quick and full digit model configs.
"""
from __future__ import annotations

import argparse
import time

import torch

from hw2lib import config
from hw2lib.unet import build_unet, count_parameters


def timed(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes on a CPU)")
    args = parser.parse_args()
    cfg = config.from_params("ddpm", profile="quick")
    model = build_unet(cfg).eval()
    n = args.batch
    x, t, y = torch.randn(n, 3, 28, 28), torch.randint(0, 1000, (n,)), torch.randint(0, 11, (n,))
    rows = []
    with torch.no_grad():
        base = timed(lambda: model(x, t, y))
    rows.append(("no_grad, float32", base))
    with torch.inference_mode():
        rows.append(("inference_mode, float32", timed(lambda: model(x, t, y))))
        cl_model = build_unet(cfg).eval().to(memory_format=torch.channels_last)
        cl_model.load_state_dict(model.state_dict())
        xc = x.contiguous(memory_format=torch.channels_last)
        rows.append(("inference_mode, channels_last", timed(lambda: cl_model(xc, t, y))))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows.append(("inference_mode, bf16 autocast", timed(lambda: model(x, t, y))))
    if args.compile:
        compiled = torch.compile(model)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(x, t, y)
        print(f"torch.compile: first call (compile) {time.perf_counter() - start:.0f} s")
        with torch.inference_mode():
            rows.append(("inference_mode, torch.compile", timed(lambda: compiled(x, t, y))))
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(x, t, y)  # autocast is part of the graph: a second compile
            print(f"torch.compile under bf16 autocast: first call (compile) {time.perf_counter() - start:.0f} s")
            rows.append(("inference_mode, torch.compile + bf16 autocast", timed(lambda: compiled(x, t, y))))
    print(f"# forward of {n} digits, quick UNet ({count_parameters(model) / 1e6:.2f} M), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| option | images/s | ratio to no_grad float32 |\n|---|---|---|")
    for name, sec in rows:
        print(f"| {name} | {n / sec:.0f} | {base / sec:.2f}x |")

    print("\n| training config | parameters | images/s (AdamW step) |\n|---|---|---|")
    for profile in ("quick", "full"):
        c = config.from_params("ddpm", profile=profile)
        net = build_unet(c).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        b = 32
        xb, tb, yb = torch.randn(b, 3, 28, 28), torch.randint(0, 1000, (b,)), torch.randint(0, 11, (b,))

        def step(net=net, opt=opt, xb=xb, tb=tb, yb=yb):
            loss = (net(xb, tb, yb) - xb).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        sec = timed(step, repeats=3)
        print(f"| {profile} (batch {b}) | {count_parameters(net) / 1e6:.2f} M | {b / sec:.1f} |")


if __name__ == "__main__":
    main()
