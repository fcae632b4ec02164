"""Benchmark (not a test): t-SNE time for 5,000 and 20,000 points, scikit-learn vs openTSNE.

The points are what ``hw2lib.dann.embed_tsne`` embeds: 768-d features (the DANN feature
extractor's size) reduced to 50 dims with PCA first; here they are a mixture of 20
Gaussian clusters (10 digits x 2 domains) so that the neighbour structure is realistic.
Each library runs with the same perplexity (30), PCA initialisation and iteration
count (scikit-learn's default 1000 = openTSNE's 250 early exaggeration + 750).

    python bench/bench_tsne.py                   # 5000 and 20000 points, all cores torch sees
    python bench/bench_tsne.py --sizes 2000 5000 --threads 1

openTSNE is optional: it is timed when importable, else reported as missing.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def features(n: int, dim: int = 768, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(clusters, dim))
    labels = rng.integers(clusters, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)


def pca50(x: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=50, random_state=seed).fit_transform(x).astype(np.float32)


def run_sklearn(x: np.ndarray, threads: int, seed: int = 0) -> float:
    from sklearn.manifold import TSNE

    t0 = time.perf_counter()
    TSNE(n_components=2, perplexity=30.0, init="pca", learning_rate="auto", random_state=seed,
         n_jobs=threads).fit_transform(x)
    return time.perf_counter() - t0


def run_opentsne(x: np.ndarray, threads: int, seed: int = 0) -> float:
    import openTSNE

    t0 = time.perf_counter()
    openTSNE.TSNE(n_components=2, perplexity=30.0, initialization="pca", learning_rate="auto", n_iter=750,
                  early_exaggeration_iter=250, n_jobs=threads, random_state=seed, verbose=False).fit(x)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--libraries", nargs="+", default=["sklearn", "opentsne"], choices=["sklearn", "opentsne"])
    args = parser.parse_args(argv)

    import sklearn

    try:
        import openTSNE

        have_open = openTSNE.__version__
    except ImportError:
        have_open = None
    print(f"python {platform.python_version()}, scikit-learn {sklearn.__version__}, "
          f"openTSNE {have_open or 'not installed'}, {args.threads} thread(s), {os.cpu_count()} cores")
    print(f"{'points':>8} {'library':>10} {'seconds':>9}")
    for n in args.sizes:
        x = pca50(features(n))
        for lib in args.libraries:
            if lib == "opentsne" and not have_open:
                print(f"{n:>8} {'openTSNE':>10} {'missing':>9}")
                continue
            seconds = (run_sklearn if lib == "sklearn" else run_opentsne)(x, args.threads)
            print(f"{n:>8} {lib:>10} {seconds:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
