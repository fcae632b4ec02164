"""Small shipped weights under ``weights/``: ``<name>.pt`` (EMA weights, float16) and ``<name>.json``.

The manifest records the command, profile, config, steps, images seen, seconds,
device, data manifest checksum, loss curve, accuracies and the sha256 of the
weights file; ``load_weights`` checks that sha256 and the config before use.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, paths
from .config import as_dict, model_keys


def weights_path(name: str) -> Path:
    return paths.weights_dir() / f"{name}.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_weights(name: str, model: torch.nn.Module, cfg, part: str, manifest: dict[str, Any]) -> Path:
    """Write ``weights/<name>.pt`` (float16 state_dict + config) and its manifest, both atomically."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = weights_path(name)
    checkpoint.save(path, {"model": state, "part": part, "dtype": "float16"}, config=as_dict(cfg))
    info = {"name": name, "file": path.name, "part": part, "config": as_dict(cfg), **manifest,
            "sha256": sha256_file(path), "bytes": path.stat().st_size}
    checkpoint.atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    return path


def read_manifest(name: str) -> dict[str, Any]:
    path = weights_path(name).with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"weights manifest {path} is missing")
    return json.loads(path.read_text())


def load_weights(name: str, model: torch.nn.Module, cfg, part: str) -> dict[str, Any]:
    """Load shipped weights into ``model`` after checking sha256 and config; returns the manifest."""
    path = weights_path(name)
    manifest = read_manifest(name)
    digest = sha256_file(path)
    if digest != manifest.get("sha256"):
        raise checkpoint.CheckpointError(
            f"weights {path} do not match their manifest (sha256 {digest[:12]} vs {str(manifest.get('sha256'))[:12]})")
    keys = [k for k in model_keys(part) if k not in ("batch_size", "lr", "warmup_steps", "seed", "data_source")]
    state = checkpoint.load(path, expect_config=as_dict(cfg), keys=keys)
    ref = model.state_dict()
    floats = {k: (v.to(ref[k].dtype) if k in ref and v.is_floating_point() else v) for k, v in state["model"].items()}
    checkpoint.load_state_dict_strict(model, floats, path)
    return manifest


def buffer_bytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()
