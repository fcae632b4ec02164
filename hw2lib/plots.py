"""Figure helpers: plot functions return matplotlib figures; ``save_figure`` and
``save_table`` write them under the run's folder with a JSON sidecar that records
provenance (config, data source, device, seconds, commit, date).

Layout of a run folder ``runs/<profile>/``::

    figures/<name>.png   figures/<name>.json     # figure + provenance sidecar
    tables/<name>.json   tables/<name>.md        # table rows + provenance, and its markdown
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import subprocess
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import paths  # noqa: E402
from .checkpoint import atomic_write_many  # noqa: E402


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=paths.repo_root(), capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=paths.repo_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def provenance(config: Any = None, data_source: str | None = None, device: Any = None,
               seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    from .config import as_dict

    meta: dict[str, Any] = {}
    if config is not None:
        meta["config"] = as_dict(config) if not isinstance(config, dict) else config
        meta["profile"] = meta["config"].get("profile")
        meta["seed"] = meta["config"].get("seed")
    if data_source is not None:
        meta["data_source"] = data_source
    if device is not None:
        meta["device"] = paths.describe_device(device) if not isinstance(device, str) else device
    if seconds is not None:
        meta["seconds"] = round(float(seconds), 2)
    meta["commit"] = git_commit()
    meta["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta.update(extra)
    return meta


def run_dir(profile: str) -> Path:
    path = paths.runs_dir(profile)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json(obj: Any) -> str:
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        return str(o)

    return json.dumps(obj, indent=2, default=default, sort_keys=False) + "\n"


def save_figure(fig, name: str, profile: str, meta: dict[str, Any] | None = None, dpi: int = 120,
                arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``figures/<name>.png`` (+ ``.json`` sidecar, + ``.npz`` of the arrays behind it) atomically.

    All files are written to temporary files first and renamed only when every one is on disk, so a
    failing write leaves the previous figure, sidecar and arrays as they were.  Without ``arrays`` an
    older ``<name>.npz`` (which would describe another figure) is removed.
    """
    out = run_dir(profile) / "figures"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    png = out / f"{name}.png"
    files = {png: buffer.getvalue(),
             out / f"{name}.json": _json({"name": name, "file": png.name, **(meta or {})}).encode("utf-8")}
    if arrays:
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        files[out / f"{name}.npz"] = buf.getvalue()
    atomic_write_many(files)
    if not arrays:
        (out / f"{name}.npz").unlink(missing_ok=True)
    return png


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_table(rows: Sequence[dict[str, Any]], name: str, profile: str, meta: dict[str, Any] | None = None,
               columns: Sequence[str] | None = None, caption: str | None = None) -> Path:
    """Write ``tables/<name>.json`` (rows + provenance) and ``tables/<name>.md`` atomically."""
    out = run_dir(profile) / "tables"
    columns = list(columns or (rows[0].keys() if rows else []))
    md = markdown_table(rows, columns)
    if caption:
        md += f"\n{caption}\n"
    path = out / f"{name}.json"
    atomic_write_many({out / f"{name}.md": md.encode("utf-8"),
                       path: _json({"name": name, "columns": columns, "rows": list(rows), "caption": caption,
                                    **(meta or {})}).encode("utf-8")})
    return path


def to_uint8_images(x) -> np.ndarray:
    """A batch in [-1, 1] (torch or numpy, N x C x H x W) to uint8 N x H x W x C."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.clip((np.asarray(x) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, nrow: int, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, title: str | None = None, cell: float = 0.6):
    """A figure showing uint8 images (N x H x W x C) in rows of ``nrow``."""
    images = np.asarray(images)
    n = len(images)
    ncol = nrow
    nrows = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrows, ncol, figsize=(cell * ncol + (0.8 if row_labels else 0), cell * nrows + 0.5),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        if i < n:
            img = images[i]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
    if row_labels:
        for r, label in enumerate(row_labels):
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if col_labels:
        for c, label in enumerate(col_labels):
            axes[0, c].set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    return fig


def line_plot(xs, ys: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str | None = None,
              logy: bool = False):
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, y in ys.items():
        ax.plot(xs if not isinstance(xs, dict) else xs[label], y, label=label, marker="o" if len(y) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    if len(ys) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def scatter_2d(panels: dict[str, tuple[np.ndarray, np.ndarray]], label_names: Sequence[str] | dict | None = None,
               legend_title: str | None = None, title: str | None = None, markers: dict | None = None,
               point_size: float = 6.0, alpha: float = 0.7, panel_size: float = 4.2):
    """One scatter panel per entry ``{panel title: (points N x 2, integer labels N)}``, coloured by label.

    ``label_names`` maps label values to legend names (a sequence is indexed by the value); up to
    10 labels use the ``tab10`` colours so a class keeps its colour across panels.
    """
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(panel_size * n + 1.4, panel_size), squeeze=False)
    all_labels = sorted({int(v) for _, lab in panels.values() for v in np.unique(lab)})
    cmap = plt.get_cmap("tab10" if len(all_labels) <= 10 else "tab20")
    colours = {v: cmap(i % cmap.N) for i, v in enumerate(all_labels)}

    def name(v):
        if label_names is None:
            return str(v)
        return label_names[v] if isinstance(label_names, dict) else label_names[int(v)]

    for ax, (panel_title, (pts, lab)) in zip(axes.flat, panels.items()):
        pts, lab = np.asarray(pts), np.asarray(lab)
        for v in all_labels:
            sel = lab == v
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=point_size, color=colours[v], alpha=alpha, linewidths=0,
                           marker=(markers or {}).get(v, "o"), label=name(v))
        ax.set_title(panel_title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, title=legend_title, loc="center right", fontsize=8, markerscale=2.5, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.2 / (panel_size * n + 1.4), 1))
    return fig


def curves_grid(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], xlabel: str = "epoch",
                ncols: int = 3, title: str | None = None, hlines: dict[str, float] | None = None,
                styles: dict[str, dict] | None = None, panel_size: tuple[float, float] = (4.0, 2.9)):
    """A grid of line plots ``{panel title: {series label: (xs, ys)}}``; ``hlines`` draws a dashed reference
    (e.g. chance) in the panels it names; ``styles`` gives matplotlib kwargs per series label."""
    from matplotlib.ticker import MaxNLocator

    n = len(panels)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    for ax, (panel_title, series) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in series.items():
            ys = np.asarray(ys, dtype=float)
            if np.all(np.isnan(ys)):
                continue
            ax.plot(xs, ys, label=label, marker="o" if len(ys) < 30 else None, markersize=3,
                    **(styles or {}).get(label, {}))
        if hlines and panel_title in hlines:
            ax.axhline(hlines[panel_title], color="grey", linestyle="--", linewidth=1)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def domain_samples_figure(datasets, per_row: int = 10, seed: int = 0, cell: float = 0.6):
    """One row of ``per_row`` samples per dataset, labelled ``domain (source)``.

    ``datasets``: objects with ``images`` (uint8 N x H x W x C) and optionally ``labels``,
    ``domain`` and ``source`` (a ``digits.DigitDataset``), or ``(label, images)`` pairs.
    With labels, the columns are the digits 0..9 (one seeded pick each); rows may differ in image size.
    """
    datasets = list(datasets)
    rows = []
    for item in datasets:
        if isinstance(item, tuple):
            name, images, labels = item[0], np.asarray(item[1]), None
        else:
            images, labels = np.asarray(item.images), getattr(item, "labels", None)
            name = f"{getattr(item, 'domain', '?')} ({getattr(item, 'source', '?')})"
        rng = np.random.default_rng(seed)
        if labels is not None and per_row == 10:
            labels = np.asarray(labels)
            picks = [int(rng.choice(np.flatnonzero(labels == d))) if (labels == d).any() else None for d in range(10)]
        else:
            picks = sorted(rng.choice(len(images), size=min(per_row, len(images)), replace=False).tolist())
        rows.append((name, [images[i] if i is not None else None for i in picks]))
    if not rows:
        raise ValueError("domain_samples_figure needs at least one dataset")
    fig, axes = plt.subplots(len(rows), per_row, figsize=(cell * per_row + 1.6, cell * len(rows) + 0.5), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(images) and images[c] is not None:
                img = images[c]
                grey = img.ndim == 2 or img.shape[-1] == 1
                ax.imshow(img.reshape(img.shape[:2]) if grey else img, cmap="gray" if grey else None)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if any(getattr(d, "labels", None) is not None for d in datasets if not isinstance(d, tuple)) and per_row == 10:
        for c in range(10):
            axes[0, c].set_title(str(c), fontsize=9)
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return fig
