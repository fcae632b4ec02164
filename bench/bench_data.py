"""Benchmark: build the whole offline default (mnistm, svhn, usps + faces) and load it back.

Targets (issue 3): building takes at most 60 s on 2 cores; loading from the cache at most 2 s.
Everything is written to a temporary ``HW2_DATA``, so the repository's cache is untouched.

    python bench/bench_data.py            # or: python -m bench.bench_data
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

BUILD_TARGET_S = 60.0
LOAD_TARGET_S = 2.0


def run(keep: bool = False) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="hw2_bench_data_")
    old = os.environ.get("HW2_DATA")
    os.environ["HW2_DATA"] = tmp
    try:
        import torch

        from hw2lib import digits, faces

        rows = []
        build = {}
        for domain in digits.DOMAINS:
            t = time.perf_counter()
            digits.build_offline(domain)
            build[domain] = time.perf_counter() - t
        t = time.perf_counter()
        faces.build_offline_faces(32)
        build["faces"] = time.perf_counter() - t
        total_build = sum(build.values())

        t = time.perf_counter()
        n = 0
        for domain in digits.DOMAINS:
            for split in ("train", "val"):
                n += len(digits.load_domain(domain, split, source="offline"))
        n += len(faces.load_offline_faces(32))
        load = time.perf_counter() - t

        for name, seconds in build.items():
            rows.append({"what": f"build {name}", "seconds": seconds, "target": None})
        rows.append({"what": "build all (offline default)", "seconds": total_build, "target": BUILD_TARGET_S})
        rows.append({"what": f"load all from cache ({n} images)", "seconds": load, "target": LOAD_TARGET_S})
        print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, HW2_DATA={tmp}")
        return rows
    finally:
        if old is None:
            os.environ.pop("HW2_DATA", None)
        else:
            os.environ["HW2_DATA"] = old
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def table(rows: list[dict]) -> str:
    lines = [f"{'what':<36} {'seconds':>8} {'target':>8} {'ratio':>7}", "-" * 62]
    for r in rows:
        target = f"{r['target']:.0f} s" if r["target"] else ""
        ratio = f"{r['seconds'] / r['target']:.2f}" if r["target"] else ""
        lines.append(f"{r['what']:<36} {r['seconds']:>8.2f} {target:>8} {ratio:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rows = run(keep="--keep" in argv)
    print(table(rows))
    over = [r for r in rows if r["target"] and r["seconds"] > r["target"]]
    if over:
        print("over target: " + ", ".join(r["what"] for r in over))
    return 0


if __name__ == "__main__":
    sys.exit(main())
