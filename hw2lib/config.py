"""Dataclass configs per part and the named profiles ``smoke``, ``quick``, ``full``.

A profile is a set of overrides of the dataclass defaults; ``from_params`` applies
the profile, then the caller's overrides, and rejects unknown keys.  The effective
config (``asdict``) is what checkpoints, figures and tables record.

* ``smoke`` - seconds to a few minutes on 2 CPU cores; used by the tests.
* ``quick`` - the CPU default of ``make report`` on the offline data.
* ``full``  - a GPU with the real course data.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PROFILES = ("smoke", "quick", "full")


# --------------------------------------------------------------------------- DDPM
@dataclass
class DDPMConfig:
    profile: str = "quick"
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    data_source: str = "auto"  # auto | course | torchvision | offline
    domain: str = "mnistm"
    # model
    image_size: int = 28
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)
    attn_resolutions: tuple = (7,)
    time_dim: int = 128
    num_classes: int = 10
    # schedule
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    # training
    train_steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    min_snr_gamma: float | None = 5.0
    checkpoint_every: int = 250
    train: bool = False  # True: train (or resume) instead of using the shipped weights
    # sampling / evaluation
    sampler: str = "ddim"  # ddim | ddpm
    sample_steps: int = 50
    eta: float = 0.0
    guidance: float = 2.0
    guidance_sweep: tuple = (0.0, 0.5, 1.0, 2.0, 4.0)
    n_per_digit: int = 100
    sweep_per_digit: int = 20
    sample_batch: int = 500
    autocast: str = "none"  # none | bf16: the network's forward under bfloat16 autocast while sampling
    channels_last: bool = False  # sampling: the model (converted in place) and x_t in channels_last memory format
    compile: bool = False  # sampling: torch.compile the model once, in place (~30 s on 2 CPU cores; bench/RESULTS.md)
    evaluator_epochs: int = 3
    evaluator_max_train: int | None = None  # cap on the evaluator's training images (None: all)
    interactive: bool = False


# --------------------------------------------------------------------------- DDIM
@dataclass
class DDIMConfig:
    profile: str = "quick"
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    data_source: str = "auto"
    model: str = "faces"  # faces (the offline face DDPM) | digits (the DDPM digit model) | course (face/UNet.pt)
    digit: int = -1  # model="digits": the digit label bound to the model; -1 = the null label (unconditional)
    # the offline face model: an unconditional UNet trained on the 100 offline LFW faces
    image_size: int = 32
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2, 2)
    attn_resolutions: tuple = (8,)
    time_dim: int = 128
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    train_steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.995
    min_snr_gamma: float | None = 5.0
    checkpoint_every: int = 250
    train: bool = False  # True: train (or resume) the face model instead of using the shipped weights
    # sampling
    steps: int = 50  # DDIM steps of the figures (the course's MSE check always uses 50)
    widget_steps: int = 20  # DDIM steps of the interactive explorers (a slider change redraws in <= 2 s on 2 cores)
    convention: str = "auto"  # auto (lowest MSE vs the course GT when present, else ermon) | ermon | plus-one
    clip_x0: bool | None = True  # eta sweep and slider: clip the predicted x_0 to [-1, 1] at each step;
    # None: as the convention does (plus-one clips, ermon does not); the course MSE check always uses the latter
    interpolation_clip_x0: bool | None = None  # the same for the interpolation figure and slider (None: unclipped
    # with ermon, so that the clip does not mask where the interpolated x_T lies)
    etas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    n_noises: int = 4
    alphas: tuple = tuple(round(0.1 * i, 1) for i in range(11))
    interactive: bool = False


# --------------------------------------------------------------------------- DANN
@dataclass
class DANNConfig:
    profile: str = "quick"
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    data_source: str = "auto"
    source: str = "mnistm"
    targets: tuple = ("svhn", "usps")
    epochs: int = 6
    batch_size: int = 64  # per domain: a DANN step sees batch_size source + batch_size target images
    optimizer: str = "adam"  # adam | sgd (momentum 0.9, as the paper)
    lr: float = 1e-3  # annealed as lr / (1 + 10 p) ** 0.75 when lr_anneal
    lr_anneal: bool = True
    weight_decay: float = 0.0
    gamma: float = 10.0  # lambda = lambda_max * (2 / (1 + exp(-gamma p)) - 1)
    lambda_max: float = 1.0  # 1: the paper's schedule; < 1 weakens the reversal throughout
    conv_channels: tuple = (32, 48)  # feature extractor: 5x5 convs (the paper's MNIST net); 3+ convs are padded
    batch_norm: bool = False
    hidden: int = 100  # width of the label / domain classifier layers
    domain_layers: int = 2  # hidden layers of the domain classifier
    dropout: float = 0.5  # Dropout2d on the last conv
    ema_decay: float = 0.0  # > 0: evaluate, save and predict with an exponential moving average of the weights
    max_train: int | None = None  # cap on training images per domain (None: all)
    max_eval: int | None = None
    spread_seeds: int = 2  # extra seeds for source-only and DANN (seed + 1, ...): the run-to-run spread
    tsne_points: int = 1000  # per domain
    pad_points: int = 1000  # per domain, for the proxy A-distance
    interactive: bool = False


CONFIGS: dict[str, type] = {"ddpm": DDPMConfig, "ddim": DDIMConfig, "dann": DANNConfig}

# Overrides of the defaults above, per part and profile.  ``quick`` is the default.
PROFILE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "ddpm": {
        "smoke": dict(base_channels=8, channel_mults=(1, 2), attn_resolutions=(14,), time_dim=32,
                      train_steps=6, batch_size=16, checkpoint_every=3, warmup_steps=2, train=True,
                      sample_steps=4, n_per_digit=3, sweep_per_digit=1, guidance_sweep=(0.0, 2.0),
                      evaluator_epochs=1, evaluator_max_train=1000, sample_batch=64),
        "quick": dict(sample_steps=20, autocast="bf16", sweep_per_digit=10, guidance=3.0),
        "full": dict(data_source="course", base_channels=64, channel_mults=(1, 2, 2), attn_resolutions=(14, 7),
                     time_dim=256, train_steps=30000, batch_size=256, lr=4e-4, warmup_steps=1000,
                     ema_decay=0.9995, train=True, sampler="ddpm", sample_steps=1000, sample_batch=1000,
                     sweep_per_digit=100, evaluator_epochs=10, autocast="bf16", channels_last=True),
    },
    "ddim": {
        "smoke": dict(image_size=16, base_channels=8, channel_mults=(1, 2), attn_resolutions=(8,), time_dim=32,
                      train_steps=6, batch_size=8, checkpoint_every=3, warmup_steps=2, train=True,
                      steps=3, widget_steps=2, n_noises=2, alphas=(0.0, 0.5, 1.0), etas=(0.0, 1.0)),
        "quick": dict(),
        "full": dict(data_source="course", model="course", steps=50, clip_x0=None),
    },
    "dann": {
        "smoke": dict(epochs=1, batch_size=32, max_train=256, max_eval=128, tsne_points=60, spread_seeds=1),
        # batch_norm and lambda_max 0.5: measured over 3 seeds on the offline data (notebook 03, note of issue #6)
        "quick": dict(max_train=10000, batch_norm=True, lambda_max=0.5),
        "full": dict(data_source="course", epochs=30, batch_size=256, conv_channels=(64, 128, 256), batch_norm=True,
                     hidden=512, tsne_points=2000, pad_points=2000),
    },
}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Lists become tuples where the default is a tuple (papermill passes lists)."""
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def from_params(part: str, profile: str = "quick", **params: Any):
    """The effective config of ``part`` for ``profile`` with ``params`` on top.

    ``None`` values mean "the profile's default" (notebook parameters use that).
    Unknown keys raise ``TypeError`` naming the allowed ones.
    """
    if part not in CONFIGS:
        raise ValueError(f"unknown part {part!r}; expected one of {sorted(CONFIGS)}")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {list(PROFILES)}")
    cls = CONFIGS[part]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise TypeError(
            f"unknown {part} parameter(s) {unknown}; allowed: {sorted(k for k in fields if k != 'profile')}"
        )
    values: dict[str, Any] = dict(PROFILE_OVERRIDES[part][profile])
    for key, value in params.items():
        if value is None and key != "data_root":
            continue
        values[key] = value
    values["profile"] = profile
    defaults = cls()
    values = {k: _coerce(k, v, getattr(defaults, k)) for k, v in values.items()}
    _check_types(cls, values)
    return cls(**values)


def _check_types(cls, values: dict[str, Any]) -> None:
    defaults = cls()
    for key, value in values.items():
        default = getattr(defaults, key)
        if value is None or default is None:
            continue
        expected = type(default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if expected is bool and not isinstance(value, bool):
            raise TypeError(f"parameter {key!r} must be a bool, got {value!r} ({type(value).__name__})")
        if not isinstance(value, expected):
            raise TypeError(
                f"parameter {key!r} must be of type {expected.__name__}, got {value!r} ({type(value).__name__})"
            )


def as_dict(config) -> dict[str, Any]:
    """A JSON- and ``weights_only``-friendly dict (tuples become lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def model_keys(part: str) -> tuple[str, ...]:
    """The config keys that define a checkpoint's model and training run (resume must match)."""
    return {
        "ddpm": ("domain", "image_size", "base_channels", "channel_mults", "attn_resolutions", "time_dim",
                 "num_classes", "timesteps", "beta_start", "beta_end", "batch_size", "lr", "warmup_steps",
                 "weight_decay", "ema_decay", "p_uncond", "min_snr_gamma", "seed", "data_source"),
        "ddim": ("image_size", "base_channels", "channel_mults", "attn_resolutions", "time_dim", "timesteps",
                 "beta_start", "beta_end", "batch_size", "lr", "warmup_steps", "ema_decay", "min_snr_gamma",
                 "seed", "data_source"),
        "dann": ("source", "batch_size", "lr", "gamma", "seed", "data_source"),
    }[part]


__all__ = ["DDPMConfig", "DDIMConfig", "DANNConfig", "PROFILES", "from_params", "as_dict", "model_keys", "field"]
