"""The DDIM part's glue: models, fixed noises, the eta sweep, noise interpolation, the course check.

Notebook ``02_ddim`` and the command line (``train faces``, ``ddim-faces``) call these.

Models (``cfg.model``), each an eps-model ``model(x_t, t)`` in eval mode:

* ``faces``  - a small unconditional UNet trained on the offline faces (``faces.offline_faces``,
  the 100 LFW faces of scikit-image at ``cfg.image_size``) with the course's schedule
  (linear betas 1e-4 .. 2e-2, T = 1000); shipped as ``weights/faces_<profile>.pt``
  (``python -m hw2lib train faces --profile quick``), trained / resumed here when ``cfg.train``.
* ``digits`` - the DDPM part's class-conditional digit model (``ddpm.prepare_model`` with the
  DDPM config of the same profile), bound to the label ``cfg.digit`` (or the null label).
* ``course`` - the course's 256x256 face UNet ``face/UNet.pt`` under ``data_root``.

Noises: the course's ``face/noise/00.pt ..`` for the course model; otherwise fixed noises
drawn by ``faces.make_noises(count, size, seed)``, saved in the course's format under
``runs/<profile>/ddim_noise/00.pt ..`` and read back with ``faces.load_noise``, so every
figure starts from the same x_T.

Images are mapped to 0..255 as ``torchvision.utils.save_image(x, normalize=True,
value_range=(-1, 1))`` does: ``floor((clamp(x, -1, 1) + 1) / 2 * 255 + 0.5)`` (the common
course recipe; the course's GT files do not say how they were written).  ``course_mse``
also scores the per-image min-max mapping (``save_image(x, normalize=True)`` without a
range) so that, with the course data, the MSE shows which one the GT used.

Convention (``cfg.convention``): ``auto`` takes the convention whose mean MSE against the
course GT is lowest when the GT is present (see ``course_mse``), and ``ermon`` (Song et
al.'s reference timesteps 980, 960, .., 0 going to alpha_bar = 1) otherwise.

Clipping (``cfg.clip_x0``): the eta sweep and its slider clip the predicted x_0 to [-1, 1] at
each step by default (as Ho et al.'s and diffusers' samplers do).  The small face model needs it:
unclipped, the first step (alpha_bar_980 ~ 4e-5) turns a small error of its noise estimate into an
x_0 far outside [-1, 1], and some samples end saturated or speckled.  ``None`` leaves it to the
convention (``plus-one`` clips, ``ermon`` does not), which is what the course check compares.
The interpolation figure (``cfg.interpolation_clip_x0``, default None) samples unclipped: the
clip pulls every prediction back into the data range and, with this small model that has
nearly memorised its 100 faces, hides what the shrunken linear noise does (its midpoints
collapse onto one low-contrast face).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import faces, paths, samplers
from .ddpm import ModelInfo as _BaseModelInfo
from .diffusion import checkpoint_path, schedule_from, train
from .plots import to_uint8_images
from .schedule import NoiseSchedule
from .unet import build_unet

WEIGHTS_NAME = "faces_{profile}"
MODELS = ("faces", "digits", "course")
CONVENTIONS = ("ermon", "plus-one")
MAPPINGS = ("clamp", "minmax")
COURSE_STEPS = 50  # the course's DDIM check: eta = 0, 50 steps, MSE < 20 on the 0-255 scale
COURSE_MSE_LINE = 20.0
NOISE_FOLDER = "ddim_noise"
FRESH_NOISE_OFFSET = 1_000_003  # the fresh noise of eta > 0 comes from seed + this, never from the x_T's stream


# --------------------------------------------------------------------------- data
class FaceSet:
    """The offline faces: ``images`` uint8 N x S x S x 3, ``manifest`` (with "source", "checksum"), ``source``."""

    def __init__(self, images: np.ndarray, manifest: dict[str, Any]):
        images = np.ascontiguousarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
            raise faces.DataError(f"face images must be uint8 N x S x S x 3 with N > 0, got {images.dtype} "
                                  f"{images.shape}")
        self.images = images
        self.manifest = dict(manifest)
        self.source = str(self.manifest.get("source", "offline"))
        self._tensor: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def describe(self) -> str:
        return f"{len(self)} LFW faces from scikit-image ({self.source}, {self.size}x{self.size})"

    def tensors(self) -> torch.Tensor:
        """All images as float32 N x 3 x S x S in [-1, 1] (cached)."""
        if self._tensor is None:
            self._tensor = (torch.from_numpy(self.images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()
        return self._tensor

    def __repr__(self) -> str:
        return f"FaceSet(n={len(self)}, size={self.size}, source={self.source})"


def load_data(cfg) -> FaceSet:
    """The offline face set at ``cfg.image_size`` (the course ships no face training images)."""
    images, manifest = faces.offline_faces(cfg.image_size)
    return FaceSet(images, manifest)


# --------------------------------------------------------------------------- models
@dataclass
class ModelInfo(_BaseModelInfo):
    """``ddpm.ModelInfo`` plus what the DDIM part needs to sample: the kind, image size and schedule."""

    kind: str = "faces"
    image_size: int = 32
    schedule: NoiseSchedule | None = None
    description: str = ""  # for captions: the model and what it was trained on


class LabelBound(torch.nn.Module):
    """An eps-model ``(x, t)`` around a class-conditional UNet, with one label fixed for every input."""

    def __init__(self, model: torch.nn.Module, label: int):
        super().__init__()
        self.model = model
        self.label = int(label)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = torch.full((len(x),), self.label, dtype=torch.long, device=x.device)
        return self.model(x, t, labels)


def shipped_weights_name(cfg) -> str:
    return WEIGHTS_NAME.format(profile=cfg.profile)


def schedule_for(cfg) -> NoiseSchedule:
    """The DDIM config's schedule (linear 1e-4 .. 2e-2 over 1000 steps: the course's and the DDPM part's)."""
    return schedule_from(cfg)


def prepare_model(cfg, device, progress: bool = True, max_seconds: float | None = None):
    """(eps-model in eval mode, ``ModelInfo``) for ``cfg.model``; see the module docstring."""
    if cfg.model == "faces":
        return _faces_model(cfg, device, progress, max_seconds)
    if cfg.model == "digits":
        return _digits_model(cfg, device, progress, max_seconds)
    if cfg.model == "course":
        return _course_model(cfg, device)
    raise ValueError(f"unknown DDIM model {cfg.model!r}; expected one of {list(MODELS)}")


def _faces_model(cfg, device, progress, max_seconds):
    from . import weights

    model = build_unet(cfg, num_classes=0)
    name = shipped_weights_name(cfg)
    data_note = f"{faces.LFW_FACES} offline LFW faces at {cfg.image_size}x{cfg.image_size}"
    if not cfg.train:
        path = weights.weights_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"no shipped weights {path} for profile {cfg.profile!r}; pass train=True (TRAIN=1) to train, "
                f"or run `python -m hw2lib train faces --profile {cfg.profile}`")
        manifest = weights.load_weights(name, model, cfg, "ddim")
        origin = f"shipped weights weights/{name}.pt"
        info = ModelInfo(origin, manifest.get("steps", 0), manifest.get("seconds", 0.0), manifest.get("history", []),
                         manifest, kind="faces", image_size=cfg.image_size, schedule=schedule_for(cfg),
                         description=f"face DDPM ({origin}, {manifest.get('steps', 0)} steps on {data_note})")
        return model.to(device).eval(), info
    data = load_data(cfg)
    result = train(model, data.tensors(), None, cfg, "ddim", checkpoint_path("ddim", cfg), device,
                   progress=progress, max_seconds=max_seconds)
    how = f"resumed from step {result.resumed_from}" if result.resumed_from else "from scratch"
    origin = f"trained here ({how})"
    info = ModelInfo(origin, result.step, result.seconds, result.history, kind="faces", image_size=cfg.image_size,
                     schedule=schedule_for(cfg),
                     description=f"face DDPM ({origin}, {result.step} steps on {data_note})")
    return result.ema.to(device).eval(), info


def digits_config(cfg):
    """The DDPM part's config of the same profile, seed, device and data root."""
    from . import config

    return config.from_params("ddpm", profile=cfg.profile, seed=cfg.seed, device=cfg.device,
                              data_root=cfg.data_root, train=cfg.train)


def _digits_model(cfg, device, progress, max_seconds):
    from . import ddpm

    dcfg = digits_config(cfg)
    if not -1 <= cfg.digit < dcfg.num_classes:
        raise ValueError(f"digit must be -1 (null label) or 0..{dcfg.num_classes - 1}, got {cfg.digit}")
    net, dinfo = ddpm.prepare_model(dcfg, device, progress=progress, max_seconds=max_seconds)
    label = cfg.digit if cfg.digit >= 0 else net.null_label
    what = f"digit {label}" if cfg.digit >= 0 else "the null label (unconditional)"
    info = ModelInfo(dinfo.origin, dinfo.steps, dinfo.seconds, dinfo.history, dinfo.manifest, kind="digits",
                     image_size=dcfg.image_size, schedule=schedule_from(dcfg),
                     description=f"DDPM digit model ({dinfo.origin}, {dcfg.domain}) bound to {what}")
    return LabelBound(net, label).to(device).eval(), info


def _course_model(cfg, device):
    unet = faces.course_face_paths(cfg.data_root).unet
    if unet is None:
        root = paths.course_data_root(cfg.data_root)
        where = f"under {root}" if root else "(no data_root given and HW2_DATA_ROOT is unset)"
        raise FileNotFoundError(f"model='course' needs the course's face/UNet.pt {where}\n{faces.FACE_LAYOUT}")
    model = load_unet_file(unet, device)
    origin = f"course UNet {unet}"
    return model.eval(), ModelInfo(origin, 0, 0.0, [], kind="course", image_size=faces.NOISE_SIZE,
                                   schedule=NoiseSchedule.linear(1000, 1e-4, 2e-2),
                                   description=f"the course's pretrained face UNet ({unet.name}, 256x256)")


# --------------------------------------------------------------------------- noises
def noise_dir(cfg) -> Path:
    return paths.runs_dir(cfg.profile) / NOISE_FOLDER


def seeded_noises(folder: str | os.PathLike, count: int, size: int, seed: int) -> list[torch.Tensor]:
    """``count`` fixed noises (1, 3, size, size) from ``faces.make_noises(count, size, seed)``, kept as
    ``folder/00.pt ..`` in the course's format and always returned as read back from there.

    ``folder/noise.json`` records seed, size and count; files made for another seed or size are replaced.
    The record is removed before and written after the files, so an interrupted rewrite is redone.
    """
    folder = Path(folder)
    record = folder / "noise.json"
    wanted = {"seed": int(seed), "size": int(size), "recipe": "faces.make_noises(count, size, seed)"}
    current = None
    if record.is_file():
        try:
            current = json.loads(record.read_text())
        except ValueError:
            current = None
    have = current is not None and {k: current.get(k) for k in wanted} == wanted and \
        int(current.get("count", 0)) >= count and all((folder / f"{i:02d}.pt").is_file() for i in range(count))
    if not have:
        from .checkpoint import atomic_write_text

        folder.mkdir(parents=True, exist_ok=True)
        record.unlink(missing_ok=True)  # first: a run interrupted below leaves no record, so it is redone
        for stale in folder.iterdir():
            if re.fullmatch(r"\d{2}\.pt", stale.name):
                stale.unlink()
        for i, z in enumerate(faces.make_noises(count, size, seed)):
            faces.save_noise(z, folder / f"{i:02d}.pt")
        atomic_write_text(record, json.dumps({**wanted, "count": int(count)}, indent=2) + "\n")
    return [faces.load_noise(folder / f"{i:02d}.pt", size) for i in range(count)]


def noises_for(cfg, info: ModelInfo, count: int | None = None) -> tuple[list[torch.Tensor], str]:
    """The x_T of the figures and where they came from: the course's noises for the course model,
    else seeded noises at the model's image size."""
    count = max(count or cfg.n_noises, 2)
    if info.kind == "course":
        folder = faces.course_face_paths(cfg.data_root).noise
        if folder is None:
            raise FileNotFoundError(f"model='course' needs the course's face/noise/ folder\n{faces.FACE_LAYOUT}")
        return faces.load_noises(folder, count, faces.NOISE_SIZE), f"course noises {folder}/00.pt.."
    folder = noise_dir(cfg)
    noises = seeded_noises(folder, count, info.image_size, cfg.seed)
    return noises, f"fixed noises faces.make_noises(seed={cfg.seed}) saved as {folder.name}/00.pt.."


def course_noises(cfg) -> list[torch.Tensor]:
    """All of the course's noises ``face/noise/00.pt ..`` (ten of them in the course data)."""
    folder = faces.course_face_paths(cfg.data_root).noise
    if folder is None:
        raise FileNotFoundError(f"the course's face/noise/ folder is missing\n{faces.FACE_LAYOUT}")
    return faces.load_noises(folder, None, faces.NOISE_SIZE)


def describe_data(cfg, info: ModelInfo) -> str:
    """For captions and sidecars: what the model was trained on / which course files are used."""
    if info.kind == "faces":
        data = load_data(cfg)
        return f"{data.describe()}, checksum {str(data.manifest.get('checksum', '?'))[:12]}"
    if info.kind == "digits":
        from . import ddpm

        data = ddpm.load_data(digits_config(cfg))
        return f"{data.domain} digits ({data.source}, {len(data)} training images)"
    root = paths.course_data_root(cfg.data_root)
    return f"course face data under {root} (face/noise, face/GT, face/UNet.pt)"


def clips(clip_x0: bool | None, convention: str) -> bool:
    """Whether the predicted x_0 is clipped: ``clip_x0``, or the convention's own choice when it is None."""
    return convention == "plus-one" if clip_x0 is None else bool(clip_x0)


def clip_label(clip_x0: bool | None, convention: str) -> str:
    return ("yes" if clips(clip_x0, convention) else "no") + (" (as the convention does)" if clip_x0 is None else "")


def caption(*parts: str, width: int = 72) -> str:
    """Parts joined into lines of at most ``width`` characters (for figure titles)."""
    import textwrap

    return "\n".join(line for part in parts if part for line in textwrap.wrap(part, width))


def norm_rows(alphas: Sequence[float], norms: np.ndarray,
              rows: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Per alpha: |z| / sqrt(d) of the slerp and the linear noise (a standard normal draw gives about 1)
    and, given the sampled ``rows``, each image's contrast (the standard deviation of its pixels in [-1, 1])."""
    out = []
    for i, a in enumerate(alphas):
        row = {"alpha": float(a), "slerp |z|/sqrt(d)": round(float(norms[0, i]), 3),
               "linear |z|/sqrt(d)": round(float(norms[1, i]), 3)}
        if rows is not None:
            row["slerp image std"] = round(float(rows["slerp"][i].clamp(-1, 1).std()), 3)
            row["linear image std"] = round(float(rows["linear"][i].clamp(-1, 1).std()), 3)
        out.append(row)
    return out


def setup_rows(cfg, info: ModelInfo, data_source: str, noise_source: str, convention: str,
               seconds: dict[str, float], device) -> list[dict[str, Any]]:
    """The ``ddim_setup`` table: what the figures were made with (used when there is no course GT)."""
    rows = [{"item": "model", "value": info.description}, {"item": "data", "value": data_source},
            {"item": "noises", "value": noise_source},
            {"item": "DDIM steps (figures / sliders)", "value": f"{cfg.steps} / {cfg.widget_steps}"},
            {"item": "convention", "value": convention + (" (auto: no course GT, so ermon)"
                                                          if cfg.convention == "auto" else "")},
            {"item": "x_0 clipped to [-1, 1] (eta sweep / interpolation)",
             "value": f"{clip_label(cfg.clip_x0, convention)} / {clip_label(cfg.interpolation_clip_x0, convention)}"},
            {"item": "device", "value": paths.describe_device(device)}]
    rows += [{"item": f"seconds: {k}", "value": round(v, 1)} for k, v in seconds.items()]
    return rows


# --------------------------------------------------------------------------- sampling
def fresh_noise_generator(seed: int, device="cpu") -> torch.Generator:
    """The generator of the fresh noise z of eta > 0: seeded with ``seed + FRESH_NOISE_OFFSET``.

    Not ``seed`` itself: the fixed noises are ``faces.make_noises(count, size, seed)``, drawn from
    ``seed``'s stream, so a generator seeded the same way would hand the sampler z = x_T at the
    first step (noise correlated with the model's own eps estimate; the samples then blow up).
    """
    return torch.Generator(device=device).manual_seed(int(seed) + FRESH_NOISE_OFFSET)


def _batched(eps_model, x_T: torch.Tensor, schedule: NoiseSchedule, steps: int, eta: float, convention: str,
             seed: int, device, batch: int, bar=None, clip_x0: bool | None = None) -> torch.Tensor:
    """DDIM samples of ``x_T`` in batches, in [-1, 1] on the CPU; fresh noise (eta > 0) from ``seed``.

    The fresh-noise generator restarts from ``seed`` for every call (``fresh_noise_generator``), so two
    etas see the same z draws.
    """
    out = []
    gen = fresh_noise_generator(seed, device)
    cb = (lambda i, t, x: bar.update(1)) if bar is not None else None
    for chunk in torch.split(x_T, batch):
        with torch.inference_mode():
            x = samplers.ddim_sample(eps_model, chunk.to(device), schedule, steps=steps, eta=eta,
                                     convention=convention, generator=gen, callback=cb, clip_x0=clip_x0)
        out.append(x.float().cpu())
    return torch.cat(out)


def stack(noises: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list of (1, 3, S, S) noises (or a batch) as one N x 3 x S x S batch."""
    if isinstance(noises, torch.Tensor):
        return noises if noises.ndim == 4 else noises[None]
    return torch.cat([z if z.ndim == 4 else z[None] for z in noises])


def eta_grid(eps_model, noises, schedule: NoiseSchedule, etas: Sequence[float], steps: int = 50,
             convention: str = "ermon", seed: int = 0, device="cpu", batch: int = 32, progress: bool = True,
             clip_x0: bool | None = None) -> tuple[torch.Tensor, float]:
    """Samples of every noise (columns) for every eta (rows): (len(etas), N, 3, S, S) in [-1, 1], seconds.

    ``clip_x0``: clip the predicted x_0 to [-1, 1] at each step; None: as ``convention`` does.
    """
    from tqdm.auto import tqdm

    x_T = stack(noises)
    start = time.perf_counter()
    n_batches = -(-len(x_T) // batch)
    with tqdm(total=len(etas) * n_batches * steps, desc="eta sweep", disable=not progress, leave=False) as bar:
        rows = [_batched(eps_model, x_T, schedule, steps, float(eta), convention, seed, device, batch, bar, clip_x0)
                for eta in etas]
    return torch.stack(rows), time.perf_counter() - start


def interpolation_rows(eps_model, z0: torch.Tensor, z1: torch.Tensor, schedule: NoiseSchedule,
                       alphas: Sequence[float], steps: int = 50, convention: str = "ermon", device="cpu",
                       batch: int = 32, progress: bool = True, clip_x0: bool | None = None,
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """DDIM (eta = 0) samples of slerp(z0, z1, alpha) and lerp(z0, z1, alpha) for each alpha.

    Returns ({"slerp": (A, 3, S, S), "linear": (A, 3, S, S)} in [-1, 1], the interpolated noises
    (2, A, 3, S, S), seconds).
    """
    from tqdm.auto import tqdm

    z0, z1 = stack(z0)[:1], stack(z1)[:1]
    noises = torch.cat([samplers.slerp(z0, z1, a) for a in alphas] + [samplers.lerp(z0, z1, a) for a in alphas])
    start = time.perf_counter()
    with tqdm(total=-(-len(noises) // batch) * steps, desc="interpolation", disable=not progress, leave=False) as bar:
        x = _batched(eps_model, noises, schedule, steps, 0.0, convention, 0, device, batch, bar, clip_x0)
    n = len(alphas)
    return {"slerp": x[:n], "linear": x[n:]}, noises.reshape(2, n, *noises.shape[1:]), time.perf_counter() - start


def noise_norms(noises: torch.Tensor) -> np.ndarray:
    """Euclidean norm of each flattened noise divided by sqrt(dimension) (about 1 for a standard normal draw)."""
    flat = noises.reshape(-1, noises[0, 0].numel() if noises.ndim == 5 else noises[0].numel()).double()
    return (flat.norm(dim=1) / flat.shape[1] ** 0.5).reshape(noises.shape[:-3]).numpy()


# --------------------------------------------------------------------------- images and MSE
def to_uint8(x: torch.Tensor, mapping: str = "clamp") -> np.ndarray:
    """N x 3 x H x W (model scale, about [-1, 1]) to uint8 N x H x W x 3.

    * ``clamp``: ``save_image(x, normalize=True, value_range=(-1, 1))``, i.e.
      ``floor((clamp(x, -1, 1) + 1) / 2 * 255 + 0.5)`` (``plots.to_uint8_images``);
    * ``minmax``: ``save_image(x_i, normalize=True)`` per image: its own min and max go to 0 and 255.
    """
    if mapping == "clamp":
        return to_uint8_images(x.clamp(-1, 1))
    if mapping == "minmax":
        x = x.detach().double().cpu()
        lo = x.flatten(1).min(1).values.reshape(-1, 1, 1, 1)
        hi = x.flatten(1).max(1).values.reshape(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp(min=1e-5)
        return (x * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    raise ValueError(f"unknown image mapping {mapping!r}; expected one of {list(MAPPINGS)}")


def mse_per_image(images: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Mean squared error per image on the 0-255 scale, in float64 (no uint8 wrap-around)."""
    images, gt = np.asarray(images), np.asarray(gt)
    if images.shape != gt.shape:
        raise ValueError(f"images {images.shape} and ground truth {gt.shape} differ in shape")
    diff = images.astype(np.float64) - gt.astype(np.float64)
    return (diff**2).reshape(len(diff), -1).mean(axis=1)


def choose_convention(means: dict[str, float]) -> str:
    """The key of the lowest mean MSE (ties: the first listed)."""
    if not means:
        raise ValueError("no MSE to choose a convention from")
    return min(means, key=lambda k: (means[k], list(means).index(k)))


@dataclass
class CourseMSE:
    per_image: dict[str, np.ndarray]  # "ermon" / "plus-one" [+ " (min-max)"] -> MSE per image
    means: dict[str, float]
    best: str  # the key with the lowest mean
    convention: str  # the convention of ``best``
    mapping: str  # the mapping of ``best``
    images: dict[str, np.ndarray]  # convention -> uint8 N x H x W x 3 (clamp mapping)
    seconds: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per image plus the mean: MSE for each convention (and mapping)."""
        n = len(next(iter(self.per_image.values())))
        rows = [{"image": f"{i:02d}.png", **{k: round(float(v[i]), 3) for k, v in self.per_image.items()}}
                for i in range(n)]
        rows.append({"image": "mean", **{k: round(v, 3) for k, v in self.means.items()}})
        return rows


def _key(convention: str, mapping: str) -> str:
    return convention if mapping == "clamp" else f"{convention} (min-max)"


def course_mse(eps_model, noises, gt: np.ndarray, schedule: NoiseSchedule, conventions: Sequence[str] = CONVENTIONS,
               mappings: Sequence[str] = MAPPINGS, steps: int = COURSE_STEPS, device="cpu", batch: int = 10,
               progress: bool = True) -> CourseMSE:
    """Sample every noise at eta = 0 with each convention and score it against the course GT.

    MSE per image and mean on the 0-255 scale in float, for each convention (and image mapping);
    ``best`` is the key with the lowest mean, and ``convention`` its timestep convention (what
    ``cfg.convention = "auto"`` uses).
    """
    from tqdm.auto import tqdm

    x_T = stack(noises)
    if len(x_T) != len(gt):
        raise ValueError(f"{len(x_T)} noises but {len(gt)} ground-truth images")
    per_image, images = {}, {}
    start = time.perf_counter()
    with tqdm(total=len(conventions) * -(-len(x_T) // batch) * steps, desc="course MSE", disable=not progress,
              leave=False) as bar:
        for conv in conventions:
            x = _batched(eps_model, x_T, schedule, steps, 0.0, conv, 0, device, batch, bar)
            for mapping in mappings:
                out = to_uint8(x, mapping)
                if mapping == "clamp":
                    images[conv] = out
                per_image[_key(conv, mapping)] = mse_per_image(out, gt)
    means = {k: float(v.mean()) for k, v in per_image.items()}
    best = choose_convention(means)
    conv, mapping = next((c, m) for c in conventions for m in mappings if _key(c, m) == best)
    return CourseMSE(per_image, means, best, conv, mapping, images, time.perf_counter() - start)


def pick_convention(cfg, mse: CourseMSE | None = None) -> str:
    """``cfg.convention`` unless ``auto``: then the course MSE's best, or ``ermon`` without the course GT."""
    if cfg.convention != "auto":
        if cfg.convention not in CONVENTIONS:
            raise ValueError(f"unknown convention {cfg.convention!r}; expected auto or one of {list(CONVENTIONS)}")
        return cfg.convention
    return mse.convention if mse is not None else "ermon"


def course_gt(cfg) -> np.ndarray | None:
    """The course's GT images (uint8 10 x 256 x 256 x 3) when ``face/GT`` is under data_root, else None."""
    folder = faces.course_face_paths(cfg.data_root).gt
    return None if folder is None else faces.load_gt(folder)


# --------------------------------------------------------------------------- figures
def eta_figure(images: torch.Tensor, etas: Sequence[float], title: str):
    """Rows: eta; columns: the noises.  ``images`` is (len(etas), N, 3, S, S) in [-1, 1]."""
    from .plots import image_grid

    n = images.shape[1]
    fig = image_grid(to_uint8(images.flatten(0, 1)), nrow=n, row_labels=[f"eta = {e:g}" for e in etas],
                     col_labels=[f"noise {i:02d}" for i in range(n)], cell=1.1)
    return _title(fig, title)


def interpolation_figure(rows: dict[str, torch.Tensor], alphas: Sequence[float], title: str,
                         norms: np.ndarray | None = None):
    """A slerp row and a linear row; the column titles give alpha (and the noise norm ratio per row)."""
    from .plots import image_grid

    names = list(rows)
    labels = []
    for r, name in enumerate(names):
        labels.append(name if norms is None else f"{name}\n|z| min {norms[r].min():.2f}")
    images = torch.cat([rows[k] for k in names])
    fig = image_grid(to_uint8(images), nrow=len(alphas), row_labels=labels,
                     col_labels=[f"alpha {a:g}" if i == 0 else f"{a:g}" for i, a in enumerate(alphas)], cell=0.9)
    return _title(fig, title)


def uint8_figure(images: np.ndarray, title: str, labels: Sequence[str] | None = None):
    from .plots import image_grid

    return _title(image_grid(images, nrow=min(10, len(images)), col_labels=labels, cell=1.1), title)


def _title(fig, title: str):
    """A (multi-line) title above the grid; ``save_figure``'s tight bounding box keeps all of it."""
    if title:
        fig.suptitle(title, y=0.99, va="bottom", fontsize=9)
    return fig


# --------------------------------------------------------------------------- course folder
from .checkpoint import write_image_folder  # noqa: E402,F401  (the atomic folder writer, shared with ddpm)


def load_unet_file(path: str | os.PathLike, device) -> torch.nn.Module:
    """The course's face UNet from ``UNet.pt`` (``ddim-faces`` and ``model="course"``); tests replace this
    with a tiny stand-in."""
    from .course_unet import load_course_unet

    return load_course_unet(path, map_location=device)


def _noise_size(folder: Path) -> int:
    """The side of ``folder/00.pt`` (256 for the course's noises); 256 when it cannot be read (the loader
    then reports what is wrong with the file)."""
    try:
        x = torch.load(folder / "00.pt", map_location="cpu", weights_only=True)
        if isinstance(x, torch.Tensor) and x.ndim in (3, 4) and x.shape[-1] == x.shape[-2]:
            return int(x.shape[-1])
    except Exception:  # noqa: BLE001 - faces.load_noise gives the clear error
        pass
    return faces.NOISE_SIZE


def generate_faces(noise_dir: str | os.PathLike, out_dir: str | os.PathLike, unet_path: str | os.PathLike,
                   steps: int = COURSE_STEPS, eta: float = 0.0, convention: str = "ermon", mapping: str = "clamp",
                   seed: int = 0, device="cpu", batch: int = 10, overwrite: bool = False,
                   progress: bool = True) -> tuple[Path, list[str], float]:
    """``00.png ..`` in ``out_dir``, one per noise ``00.pt ..`` of ``noise_dir`` (DDIM with the face UNet)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; choose another or pass --overwrite")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; expected one of {list(CONVENTIONS)}")
    noise_dir = Path(noise_dir)
    noises = faces.load_noises(noise_dir, None, _noise_size(noise_dir))
    model = load_unet_file(unet_path, device)
    schedule = NoiseSchedule.linear(1000, 1e-4, 2e-2)
    start = time.perf_counter()
    x_T = stack(noises)
    with tqdm(total=-(-len(x_T) // batch) * steps, desc="ddim-faces", disable=not progress) as bar:
        x = _batched(model, x_T, schedule, steps, eta, convention, seed, device, batch, bar)
    names = [f"{i:02d}.png" for i in range(len(noises))]
    write_image_folder(to_uint8(x, mapping), names, out, overwrite=overwrite)
    return out, names, time.perf_counter() - start


# --------------------------------------------------------------------------- command line
def add_cli(sub) -> None:
    p = sub.add_parser("ddim-faces", help="DDIM faces 00.png.. from the course's noises and UNet.pt",
                       description="Generate one 256x256 face per noise file NOISE_DIR/00.pt, 01.pt, .. with the "
                                   "course's face UNet (DDIM, eta 0, 50 steps by default) and write exactly "
                                   "00.png, 01.png, .. into OUT_DIR. Pixels: floor((clamp(x,-1,1)+1)/2*255+0.5), "
                                   "as torchvision's save_image(x, normalize=True, value_range=(-1, 1)).")
    p.add_argument("noise_dir", metavar="NOISE_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("unet_pt", metavar="UNET_PT")
    p.add_argument("--steps", type=int, default=COURSE_STEPS, help="DDIM steps (default 50)")
    p.add_argument("--eta", type=float, default=0.0, help="0 = deterministic DDIM, 1 = DDPM-like (default 0)")
    p.add_argument("--convention", default="ermon", choices=list(CONVENTIONS),
                   help="timesteps: ermon = 980..0 to alpha_bar=1 (default); plus-one = 981..1 with x0 clipping")
    p.add_argument("--mapping", default="clamp", choices=list(MAPPINGS),
                   help="pixel mapping: clamp to [-1, 1] (default) or each image's min-max")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh noise when eta > 0")
    p.add_argument("--batch", type=int, default=10, help="images per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=_cmd_faces)


def _cmd_faces(args) -> int:
    from .checkpoint import CheckpointError

    try:
        device = paths.pick_device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        out, names, seconds = generate_faces(args.noise_dir, args.out_dir, args.unet_pt, steps=args.steps,
                                             eta=args.eta, convention=args.convention, mapping=args.mapping,
                                             seed=args.seed, device=device, batch=args.batch,
                                             overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, CheckpointError, faces.DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {names[0]}..{names[-1]} ({len(names)} images) to {out} in {seconds:.1f} s "
          f"(DDIM {args.steps} steps, eta {args.eta}, {args.convention})")
    return 0
