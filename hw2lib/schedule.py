"""Noise schedules for DDPM / DDIM.

Betas are computed in float64 (as the course's face model was trained) and the
derived quantities are kept in float64; ``extract`` gathers per-sample values
as float32 (or the dtype asked for) for the model's arithmetic. Timesteps are
0-based: ``t = 0 .. T-1`` and ``alpha_bar[t] = prod_{s<=t} (1 - beta_s)``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch


def linear_betas(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


@dataclass
class NoiseSchedule:
    """``betas``, ``alphas``, ``alpha_bars`` (float64 tensors, length T) and helpers."""

    betas: torch.Tensor

    def __post_init__(self):
        self.betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if self.betas.ndim != 1 or not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.alpha_bars_prev = prev
        # q(x_{t-1} | x_t, x_0): variance tilde beta_t
        self.posterior_variance = self.betas * (1.0 - prev) / (1.0 - self.alpha_bars)

    @classmethod
    def linear(cls, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> "NoiseSchedule":
        return cls(torch.from_numpy(linear_betas(timesteps, beta_start, beta_end)))

    @property
    def T(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_bar at 0-based ``t``; ``t = -1`` gives 1 (the clean image).  On the schedule's device;
        a Python int indexes without building an index tensor (no host-to-device copy per DDIM step)."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64, device=self.alpha_bars.device), self.alpha_bars])
        if isinstance(t, int):
            return padded[t + 1]
        t = torch.as_tensor(t, dtype=torch.long)
        return padded[t + 1]

    def to(self, device) -> "NoiseSchedule":
        """The same schedule (float64 kept) with its tensors on ``device``, so that a sampler on a GPU
        gathers from it without a blocking host-to-device copy at every step."""
        out = copy.copy(self)
        for name in ("betas", "alphas", "alpha_bars", "alpha_bars_prev", "posterior_variance"):
            setattr(out, name, getattr(self, name).to(device))
        return out

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return ab / (1.0 - ab)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4)."""
        ab = extract(self.alpha_bars, t, x0.shape, x0.dtype)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise


def extract(values: torch.Tensor, t: torch.Tensor, shape: torch.Size | tuple, dtype=torch.float32) -> torch.Tensor:
    """``values[t]`` reshaped to broadcast over a batch of ``shape`` (N, 1, 1, ...), on ``t``'s device."""
    t = torch.as_tensor(t, dtype=torch.long)
    out = values.to(t.device)[t].to(dtype)
    return out.reshape(len(t), *([1] * (len(shape) - 1)))


def ddim_timesteps(T: int, steps: int, convention: str = "ermon") -> tuple[list[int], list[int]]:
    """The model's timesteps (descending) and the step each goes to, for a uniform subset.

    * ``ermon``: t = T - T/steps, ..., T/steps, 0 (980, 960, ..., 0 for T=1000, 50 steps);
      the last step goes to t = -1, i.e. alpha_bar = 1 (Song et al.'s reference code).
    * ``plus-one``: t = 981, 961, ..., 1; the last step goes to t = 0 (alpha_bar_0).
    """
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    skip = T // steps
    seq = list(range(0, T, skip))[:steps]
    if convention == "ermon":
        prev = [-1] + seq[:-1]
    elif convention == "plus-one":
        seq = [s + 1 for s in seq]
        if seq[-1] >= T:
            raise ValueError(f"plus-one convention needs T // steps >= 2 (T={T}, steps={steps})")
        prev = [0] + seq[:-1]
    else:
        raise ValueError(f"unknown DDIM convention {convention!r}; expected 'ermon' or 'plus-one'")
    return seq[::-1], prev[::-1]
