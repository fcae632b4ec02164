"""Atomic checkpoint saving and safe loading.

* ``save`` writes a temporary file in the destination folder, fsyncs it and
  ``os.replace``s it over the target, so a crash leaves either the old file or the
  new one, never half of one, and no temporary file behind.
* ``load`` uses ``torch.load(weights_only=True)``: a pickle that carries code is
  refused, and a truncated or corrupt file gives a ``CheckpointError`` naming the
  file instead of a traceback from inside pickle.
* Every checkpoint stores its config; ``load(..., expect_config=cfg, keys=...)``
  refuses one made for another config and names the keys that differ.
"""
from __future__ import annotations

import contextlib
import io
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file named."""


def library_versions() -> dict[str, str]:
    import numpy

    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(numpy.__version__)}
    try:
        import torchvision

        versions["torchvision"] = str(torchvision.__version__)
    except Exception:  # pragma: no cover - torchvision is a dependency
        pass
    return versions


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success fsync and rename over ``path``.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_many(files: dict[str | os.PathLike, bytes]) -> None:
    """Write several files that belong together (a figure, its sidecar and its arrays).

    Every file is first written and fsynced to a temporary file beside its target; only when all
    of them are on disk are they renamed over their targets.  A failing write (disk full, I/O
    error) therefore leaves every previous file as it was and no temporary file behind.
    """
    done: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            done.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        while done:
            tmp, path = done[0]
            os.replace(tmp, path)
            done.pop(0)
    except BaseException:
        for tmp, _ in done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def save(path: str | os.PathLike, payload: dict[str, Any], config: dict[str, Any] | None = None,
         step: int | None = None) -> Path:
    """Save ``payload`` (tensors, state_dicts, numbers, strings) atomically to ``path``."""
    path = Path(path)
    data = dict(payload)
    if config is not None:
        data["config"] = dict(config)
    if step is not None:
        data["step"] = int(step)
    data.setdefault("versions", library_versions())
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load(path: str | os.PathLike, expect_config: dict[str, Any] | None = None,
         keys: Iterable[str] | None = None, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely; check its config against ``expect_config`` on ``keys``."""
    path = Path(path)
    data = safe_torch_load(path, "checkpoint", "a file written by torch.save", map_location=map_location)
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(data).__name__}; expected a dict")
    if expect_config is not None:
        check_config(path, data.get("config"), expect_config, keys)
    return data


def safe_torch_load(path: str | os.PathLike, what: str, expected: str = "", error: type[Exception] = CheckpointError,
                    map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file: missing, empty, a pickle that
    carries code (refused, never executed), or a corrupt / truncated / foreign file."""
    import warnings

    path = Path(path)
    tail = f"; expected {expected}" if expected else ""
    if not path.is_file():
        raise error(f"{what} {path} does not exist{tail}")
    if path.stat().st_size == 0:
        raise error(f"cannot read {what} {path}: it is empty (0 bytes){tail}")
    try:
        with warnings.catch_warnings():  # a plain pickle: torch warns about its protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        text = str(exc)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "blocked" in ln),
                      lines[0] if lines else type(exc).__name__)
        if "GLOBAL" in text or "Unsupported global" in text:  # code the unpickler would have called
            raise error(f"refused to load {what} {path}: it holds Python objects beyond tensors and plain data; "
                        f"an untrusted pickle is never executed ({detail}){tail}") from None
        raise error(f"cannot read {what} {path}: corrupt, truncated or not a torch file ({type(exc).__name__}: "
                    f"{detail}; nothing in it was executed){tail}") from None


def check_config(path, stored: dict[str, Any] | None, expected: dict[str, Any],
                 keys: Iterable[str] | None = None) -> None:
    if stored is None:
        raise CheckpointError(f"checkpoint {path} stores no config; cannot check it was made for this one")
    keys = list(keys) if keys is not None else sorted(set(stored) | set(expected))
    differ = []
    for key in keys:
        a, b = _norm(stored.get(key, "<missing>")), _norm(expected.get(key, "<missing>"))
        if a != b:
            differ.append(f"{key}: checkpoint {a!r} vs wanted {b!r}")
    if differ:
        raise CheckpointError(f"checkpoint {path} was made for another config; differing keys: " + "; ".join(differ))


def _norm(value):
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    return value


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                           source: str | os.PathLike) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and lists missing / extra keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or extra or shapes:
        def short(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys [{short(missing)}]")
        if extra:
            parts.append(f"unexpected keys [{short(extra)}]")
        if shapes:
            parts.append(f"shape mismatches [{short(shapes)}]")
        raise CheckpointError(f"state_dict in {source} does not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def latest(folder: str | os.PathLike, pattern: str = "*.pt") -> Path | None:
    """The newest checkpoint (by step in the name, then mtime) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = [p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    return max(files, key=lambda p: (p.stat().st_mtime_ns, p.name)) if files else None


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    py = random.getstate()
    state["python"] = [py[0], list(py[1]), py[2]]
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        v, internal, gauss = state["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


Callback = Callable[..., Any]


def write_image_folder(images: np.ndarray, names: Sequence[str], out_dir: str | os.PathLike,
                       overwrite: bool = False) -> Path:
    """Write ``images`` (uint8 N x H x W x 3) as ``names`` into ``out_dir``, via a temporary folder renamed
    when complete; a non-empty ``out_dir`` is refused unless ``overwrite``."""
    from PIL import Image

    out_dir = Path(out_dir)
    if len(images) != len(names):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for img, name in zip(images, names):
            Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
