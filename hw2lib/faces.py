"""Faces for the DDIM part: the course's files, and the offline face set.

* The course layout under ``data_root`` (``hw2_data``)::

      face/noise/00.pt .. 09.pt   each a float tensor (1, 3, 256, 256), the fixed x_T
      face/GT/00.png .. 09.png    the ground-truth DDIM (eta = 0) outputs, 256x256 RGB
      face/UNet.pt                the pretrained face UNet (see ``course_unet.py``)

  Tensors load with ``torch.load(weights_only=True)``: a file that carries Python code
  is refused, never executed.
* The offline default: the face images of scikit-image's ``lfw_subset`` (its first 100
  images; the other 100 are non-face background crops), 25x25 grey, resized to a
  power-of-two size (32 by default) and replicated to 3 channels, cached under
  ``data/offline/faces/`` with a manifest (counts, seed, packages, checksum).
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from . import paths
from .digits import DataError, _save_npz, _versions, checksum, read_png

NOISE_SIZE = 256
FACE_LAYOUT = """expected layout under data_root:
  face/noise/00.pt .. 09.pt   (each a float tensor of shape (1, 3, 256, 256))
  face/GT/00.png .. 09.png    (256x256 RGB)
  face/UNet.pt                (the course's face UNet state_dict)"""
LFW_FACES = 100  # skimage.data.lfw_subset(): "100 first images are faces and subsequent 100 are non-faces"
OFFLINE_SEED = 0
OFFLINE_VERSION = 1  # bump when the offline face recipe changes: older caches are rebuilt


# --------------------------------------------------------------------------- course files
class CoursePaths(NamedTuple):
    noise: Path | None  # face/noise/
    gt: Path | None  # face/GT/
    unet: Path | None  # face/UNet.pt


def course_face_paths(data_root: str | os.PathLike | None = None) -> CoursePaths:
    """The course's noise folder, GT folder and ``UNet.pt`` under ``data_root`` (or ``HW2_DATA_ROOT``);
    each None where absent."""
    root = paths.course_data_root(data_root)
    if root is None:
        return CoursePaths(None, None, None)
    face = root / "face"
    noise, gt, unet = face / "noise", face / "GT", face / "UNet.pt"
    return CoursePaths(noise if noise.is_dir() else None, gt if gt.is_dir() else None,
                       unet if unet.is_file() else None)


def _expected(size: int) -> str:
    return f"a float tensor of shape (1, 3, {size}, {size})"


def load_noise(path: str | os.PathLike, size: int = NOISE_SIZE) -> torch.Tensor:
    """One noise tensor, float32 (1, 3, size, size); anything else is a ``DataError`` naming the file."""
    from .checkpoint import safe_torch_load

    path = Path(path)
    x = safe_torch_load(path, "noise file", _expected(size), error=DataError)
    if not isinstance(x, torch.Tensor):
        raise DataError(f"noise file {path} holds a {type(x).__name__}; expected {_expected(size)}")
    if not x.is_floating_point():
        raise DataError(f"noise file {path} holds a {x.dtype} tensor; expected {_expected(size)}")
    if x.ndim == 3 and tuple(x.shape) == (3, size, size):
        x = x[None]
    if tuple(x.shape) != (1, 3, size, size):
        raise DataError(f"noise file {path} holds a tensor of shape {tuple(x.shape)}; expected {_expected(size)}")
    if not torch.isfinite(x).all():
        raise DataError(f"noise file {path} holds NaN or infinite values; expected {_expected(size)} of finite values")
    return x.float().contiguous()


def _numbered(folder: Path, suffix: str, count: int | None, what: str) -> list[Path]:
    """``00<suffix>, 01<suffix>, ...``: the first ``count`` (all must exist), or every consecutive one from 00."""
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} is missing\n{FACE_LAYOUT}")
    if count is not None:
        files = [folder / f"{i:02d}{suffix}" for i in range(count)]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise DataError(f"{what} folder {folder} lacks {', '.join(missing)}; expected 00{suffix} .. "
                            f"{count - 1:02d}{suffix}\n{FACE_LAYOUT}")
        return files
    names = {p.name for p in folder.iterdir() if re.fullmatch(rf"\d{{2}}{re.escape(suffix)}", p.name)}
    files = []
    while f"{len(files):02d}{suffix}" in names:
        files.append(folder / f"{len(files):02d}{suffix}")
    if not files:
        raise DataError(f"{what} folder {folder} holds no 00{suffix}; expected 00{suffix} .. 09{suffix}\n{FACE_LAYOUT}")
    return files


def load_noises(folder: str | os.PathLike, count: int | None = None, size: int = NOISE_SIZE) -> list[torch.Tensor]:
    """The noises ``00.pt, 01.pt, ...`` of a folder (``count`` of them, or all consecutive ones)."""
    return [load_noise(p, size) for p in _numbered(Path(folder), ".pt", count, "noise")]


def load_gt(folder: str | os.PathLike, count: int | None = None, size: int = NOISE_SIZE) -> np.ndarray:
    """The ground-truth images ``00.png, 01.png, ...`` as uint8 N x size x size x 3."""
    files = _numbered(Path(folder), ".png", count, "ground-truth")
    return np.stack([read_png(p, size=(size, size)) for p in files])


def save_noise(x: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a noise tensor in the course's format (a bare tensor, ``torch.save``) atomically."""
    from .checkpoint import atomic_write_bytes

    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[:2] != (1, 3):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"save_noise wants a float tensor of shape (1, 3, H, W), got {shape}")
    buffer = io.BytesIO()
    torch.save(x.detach().to("cpu", torch.float32).contiguous().clone(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def make_noises(count: int, size: int = NOISE_SIZE, seed: int = 0) -> list[torch.Tensor]:
    """``count`` standard-normal tensors (1, 3, size, size), drawn in order from one seeded generator
    (so the first k are the same whatever ``count`` is)."""
    g = torch.Generator().manual_seed(int(seed))
    return [torch.randn(1, 3, size, size, generator=g) for _ in range(count)]


# --------------------------------------------------------------------------- offline face set
def offline_faces_dir() -> Path:
    return paths.data_dir() / "offline" / "faces"


def _check_size(size: int) -> int:
    if not isinstance(size, (int, np.integer)) or size < 8 or size & (size - 1):
        raise ValueError(f"offline face size must be a power of two >= 8 (8, 16, 32, 64, ...), got {size!r}")
    return int(size)


def lfw_faces() -> np.ndarray:
    """The 100 face images of ``skimage.data.lfw_subset()`` as float32 in [0, 1] (100 x 25 x 25)."""
    import skimage.data

    images = np.asarray(skimage.data.lfw_subset())
    if images.ndim != 3 or len(images) < 2 * LFW_FACES:
        raise DataError(f"skimage.data.lfw_subset() gave shape {images.shape}; expected (200, 25, 25)")
    faces = images[:LFW_FACES].astype(np.float32)
    if faces.max() > 1.5:  # documented as uint8; shipped as float64 in [0, 1]
        faces = faces / 255.0
    return faces


def build_offline_faces(size: int = 32, seed: int = OFFLINE_SEED) -> dict[str, Any]:
    """Build ``data/offline/faces/faces_<size>.npz`` and its manifest; deterministic (no random step)."""
    import torch.nn.functional as F

    from .checkpoint import atomic_write_text

    size = _check_size(size)
    grey = torch.from_numpy(lfw_faces())[:, None]
    x = F.interpolate(grey, size=(size, size), mode="bicubic", align_corners=False,
                      antialias=size < grey.shape[-1])
    images = (x.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).expand(-1, 3, -1, -1)
    images = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
    folder = offline_faces_dir()
    _save_npz(folder / f"faces_{size}.npz", images=images)
    manifest = {
        "domain": "faces", "source": "offline", "seed": seed, "version": OFFLINE_VERSION, "size": size,
        "counts": {"faces": int(len(images)), "non_faces_dropped": LFW_FACES},
        "checksum": checksum(images),
        "recipe": f"skimage.data.lfw_subset(): the first {LFW_FACES} images (faces; the last {LFW_FACES} are "
                  f"non-face crops, dropped), 25x25 grey, bicubic-resized to {size}x{size}, grey replicated to RGB; "
                  "no random step (the seed is recorded for uniformity)",
        "packages": _versions("scikit-image", "numpy", "torch"),
    }
    atomic_write_text(folder / f"manifest_{size}.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def offline_faces(size: int = 32, seed: int = OFFLINE_SEED) -> tuple[np.ndarray, dict[str, Any]]:
    """The offline face set (uint8 N x size x size x 3) and its manifest; built on first use."""
    size = _check_size(size)
    folder = offline_faces_dir()
    manifest_path, path = folder / f"manifest_{size}.json", folder / f"faces_{size}.npz"
    manifest = None
    if manifest_path.is_file() and path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = None
    if manifest is None or manifest.get("seed") != seed or manifest.get("version") != OFFLINE_VERSION:
        manifest = build_offline_faces(size, seed)
    try:
        with np.load(path) as z:
            images = z["images"]
    except Exception as exc:
        raise DataError(f"offline face cache {path} is unreadable ({exc}); delete {folder} to rebuild it") from None
    return images, manifest


def load_offline_faces(size: int = 32) -> np.ndarray:
    """uint8 N x size x size x 3: the offline face set (see ``offline_faces`` for its manifest)."""
    return offline_faces(size)[0]
