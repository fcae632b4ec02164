"""DDPM and DDIM sampling as plain functions over any noise-prediction model.

``eps_model(x_t, t)`` takes a batch and a 1-D integer tensor of 0-based timesteps
and returns the predicted noise.  Conditioning is bound by a wrapper:
``guided(model, labels, w)`` gives classifier-free guidance as ONE forward pass
of batch 2N (conditional and null labels concatenated),
``eps = (1 + w) * eps_cond - w * eps_null``; ``w = 0`` skips the null half.

Samplers start from an explicit ``x_T`` so that sweeps compare like with like,
draw any fresh noise from an explicit ``generator``, and call
``callback(step_index, t, x)`` after each step with the new x (for reverse-process
figures and progress bars).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .schedule import NoiseSchedule, ddim_timesteps, extract

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]


def guided(model: torch.nn.Module, labels: torch.Tensor, w: float = 0.0) -> EpsModel:
    """Classifier-free guidance around a conditional ``model(x, t, labels)`` (null label = ``model.null_label``)."""
    null = torch.full_like(labels, model.null_label)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if w == 0:
            return model(x, t, labels).to(x.dtype)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).to(x.dtype)
        cond, uncond = out.chunk(2)
        return (1.0 + w) * cond - w * uncond

    return eps_model


def unconditional(model: torch.nn.Module) -> EpsModel:
    return lambda x, t: model(x, t)


def _timesteps(t: int, n: int, device) -> torch.Tensor:
    return torch.full((n,), t, dtype=torch.long, device=device)


@torch.no_grad()
def ddpm_sample(eps_model: EpsModel, x_T: torch.Tensor, schedule: NoiseSchedule,
                generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2), sigma_t^2 = tilde beta_t."""
    x = x_T
    n = len(x)
    for i, t in enumerate(reversed(range(schedule.T))):
        tt = _timesteps(t, n, x.device)
        eps = eps_model(x, tt)
        beta = extract(schedule.betas, tt, x.shape, x.dtype)
        alpha = extract(schedule.alphas, tt, x.shape, x.dtype)
        ab = extract(schedule.alpha_bars, tt, x.shape, x.dtype)
        mean = (x - beta / (1.0 - ab).sqrt() * eps) / alpha.sqrt()
        if t > 0:
            var = extract(schedule.posterior_variance, tt, x.shape, x.dtype)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + var.sqrt() * z
        else:
            x = mean
        if callback is not None:
            callback(i, t, x)
    return x


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) of Song et al. 2021, eq. 16: eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)."""
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt() * (1 - alpha_bar_t / alpha_bar_prev).sqrt()


@torch.no_grad()
def ddim_sample(eps_model: EpsModel, x_T: torch.Tensor, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0,
                convention: str = "ermon", generator: torch.Generator | None = None,
                callback: Callback | None = None, clip_x0: bool | None = None) -> torch.Tensor:
    """Generalized DDIM steps (Song et al. 2021, eq. 12) on a uniform subset of ``steps`` timesteps.

    x_prev = sqrt(a_prev) * x0_pred                       ("predicted x_0")
           + sqrt(1 - a_prev - sigma_t^2) * eps            ("direction pointing to x_t")
           + sigma_t * z                                   ("random noise")
    with x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) and sigma_t from eq. 16.
    ``convention`` picks the timesteps (see ``schedule.ddim_timesteps``); ``plus-one``
    clips x0_pred to [-1, 1] unless ``clip_x0`` says otherwise.
    """
    if not 0.0 <= eta <= 1.0 + 1e-9:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    seq, prev = ddim_timesteps(schedule.T, steps, convention)
    if clip_x0 is None:
        clip_x0 = convention == "plus-one"
    x = x_T
    n = len(x)
    for i, (t, s) in enumerate(zip(seq, prev)):
        tt = _timesteps(t, n, x.device)
        a_t = schedule.alpha_bar(t).to(x.device, torch.float64)
        a_prev = schedule.alpha_bar(s).to(x.device, torch.float64)
        sigma = ddim_sigma(a_t, a_prev, eta)
        eps = eps_model(x, tt)
        x0 = (x - (1 - a_t).sqrt().to(x.dtype) * eps) / a_t.sqrt().to(x.dtype)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt().to(x.dtype) * eps
        x = a_prev.sqrt().to(x.dtype) * x0 + direction
        if eta > 0 and float(sigma) > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma.to(x.dtype) * z
        if callback is not None:
            callback(i, t, x)
    return x


def sample(eps_model: EpsModel, x_T: torch.Tensor, schedule: NoiseSchedule, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, convention: str = "ermon", generator: torch.Generator | None = None,
           callback: Callback | None = None) -> torch.Tensor:
    """``ddpm`` (all T steps; ``steps`` ignored) or ``ddim``."""
    if sampler == "ddpm":
        return ddpm_sample(eps_model, x_T, schedule, generator=generator, callback=callback)
    if sampler == "ddim":
        return ddim_sample(eps_model, x_T, schedule, steps=steps, eta=eta, convention=convention,
                           generator=generator, callback=callback)
    raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")


def lerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1.0 - alpha) * z0 + alpha * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation; the angle from the normalised dot product of the flattened tensors.

    Falls back to ``lerp`` when the two are (nearly) parallel.
    """
    a, b = z0.flatten().double(), z1.flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(theta.sin().abs()) < eps:
        return lerp(z0, z1, alpha)
    s = float(theta.sin())
    w0 = math.sin((1.0 - alpha) * float(theta)) / s
    w1 = math.sin(alpha * float(theta)) / s
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)
