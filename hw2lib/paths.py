"""Project folders, seeding and device choice.

Every path is derived from this file's location, never from the working
directory: papermill runs notebooks with cwd ``notebooks/`` while JupyterLab and
the command line may start anywhere.

Environment overrides:

* ``HW2_DATA_ROOT`` - folder holding the course's ``hw2_data`` layout
  (``digits/``, ``face/``); default: none, i.e. the offline default is used.
* ``HW2_DATA`` - where generated data (the offline default cache) lives;
  default ``<repo>/data``.
* ``HW2_RUNS`` - where runs are written; default ``<repo>/runs``.
* ``HW2_CHECKPOINTS`` - default ``<repo>/checkpoints``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def repo_root() -> Path:
    return REPO_ROOT


def data_dir() -> Path:
    """Generated data (the offline default cache), git-ignored."""
    return _env_path("HW2_DATA", REPO_ROOT / "data")


def course_data_root(data_root: str | os.PathLike | None = None) -> Path | None:
    """The course ``hw2_data`` folder given explicitly or by ``HW2_DATA_ROOT``; None if neither."""
    if data_root:
        return Path(data_root).expanduser().resolve()
    env = os.environ.get("HW2_DATA_ROOT")
    return Path(env).expanduser().resolve() if env else None


def runs_dir(profile: str | None = None) -> Path:
    base = _env_path("HW2_RUNS", REPO_ROOT / "runs")
    return base / profile if profile else base


def checkpoints_dir() -> Path:
    return _env_path("HW2_CHECKPOINTS", REPO_ROOT / "checkpoints")


def figures_dir() -> Path:
    return REPO_ROOT / "figures"


def weights_dir() -> Path:
    return REPO_ROOT / "weights"


def notebooks_dir() -> Path:
    return REPO_ROOT / "notebooks"


def report_path() -> Path:
    return REPO_ROOT / "report.md"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(device: str = "auto"):
    """``auto`` gives cuda when present, else cpu; asking for cuda without one is an error."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but torch sees no CUDA device on this machine")
    return torch.device(device)


def describe_device(device) -> str:
    """A human label for captions: 'cpu (2 threads)' or the GPU's name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
