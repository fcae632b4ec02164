"""The course's face UNet (DLCV Fall 2023 HW2, DDIM part), re-implemented so ``UNet.pt`` loads strictly.

The course ships ``UNet.pt``, a pretrained noise predictor for 256x256 RGB faces
(113,673,283 parameters, trained with ``betas = linspace(1e-4, 2e-2, 1000)``).
:class:`FaceUNet` reproduces its state_dict key for key, shape for shape and in the
same order, and computes the same function (checked in float64 against
``shared/course/expected_out_float64.npy`` by ``tests/test_course_unet.py``).

Architecture (``channel = 128``, multipliers ``(1, 1, 2, 2, 4, 4)``, two residual
blocks per level, attention at stride 16, i.e. the 512-channel level before the last)::

    time   TimeEmbedding(128) -> Linear(128, 512) -> SiLU -> Linear(512, 512)   # time.0 .. time.3
    down1  Conv3x3(3 -> 128)
    down2..down18   per level: 2 x ResBlock[+Attention], then Downsample (stride-2 Conv3x3,
                    ``downN.0``) except after the last level; channels 128,128,256,256,512,512
    mid1   ResBlock(512) + Attention;  mid2  ResBlock(512)
    up1..up23       per level, deepest first: 3 x ResBlock[+Attention] whose input is
                    ``cat([h, skip], dim=1)`` with ``skip`` popped from the stack of every
                    down-path output (down1 included), then Upsample (nearest x2 then Conv3x3,
                    ``upN.1``) except after the shallowest level
    out    GroupNorm(32, 128) -> SiLU -> Conv3x3(128 -> 3)                      # out.0, out.2

* ``TimeEmbedding``: buffer ``inv_freq = exp(arange(0, 128, 2) * (-ln(10000) / 128))``;
  ``emb = cat([sin(t * inv_freq), cos(t * inv_freq)])`` with ``t`` the raw integer
  timestep 0..999 (no scaling).
* ``ResBlock`` (``*.resblocks``): ``h = conv1(SiLU(norm1(x)))``;
  ``h = h + time.1(SiLU(temb))[:, :, None, None]``; ``h = conv2(dropout(SiLU(norm2(h))))``;
  returns ``h + skip(x)`` where ``skip`` is a 1x1 conv when the channel count changes,
  identity otherwise.  (With ``use_affine_time=True`` the time projection gives a scale
  and shift instead: ``h = (1 + gamma) * norm2(h) + beta`` with a non-affine ``norm2``;
  the course model does not use this.)
* ``SelfAttention`` (``*.attention``): ``q, k, v = qkv(norm(x))`` (one 1x1 conv),
  ``softmax(q^T k / sqrt(C))`` over all positions, ``x + out(attn v)``.  With several
  heads the channels are split into heads but the scale stays ``1/sqrt(C)``.
* Every norm is ``GroupNorm(32, C)``; every activation is SiLU.

``forward(x, time)`` takes ``x`` of shape (N, 3, H, W) with H and W divisible by 32
and ``time`` a 1-D integer tensor of N timesteps, and returns the predicted noise
(same shape as ``x``).  :func:`load_course_unet` builds the model and loads
``UNet.pt`` into it safely (``weights_only=True``, strict keys, any device).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load

__all__ = ["FaceUNet", "TimeEmbedding", "load_course_unet"]

_CONTAINER_KEYS = ("state_dict", "model", "ema", "model_state_dict", "net", "unet")


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of raw integer timesteps: ``cat([sin(t f), cos(t f)])``."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.dim = dim
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000) / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1).to(self.inv_freq.dtype)[:, None] * self.inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ResBlock(nn.Module):
    """Pre-activation residual block with the time embedding added after the first conv."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0,
                 use_affine_time: bool = False):
        super().__init__()
        self.use_affine_time = use_affine_time
        self.norm1 = nn.GroupNorm(32, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # index 0 is the (parameter-free) SiLU, so the projection is ``time.1`` as in the checkpoint
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch * (2 if use_affine_time else 1)))
        self.norm2 = nn.GroupNorm(32, out_ch, affine=not use_affine_time)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time(temb)[:, :, None, None]
        if self.use_affine_time:
            gamma, beta = t.chunk(2, dim=1)
            h = (1 + gamma) * self.norm2(h) + beta
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention(nn.Module):
    """Spatial self-attention over all H*W positions, scaled by ``1/sqrt(C)``, added residually."""

    def __init__(self, channels: int, n_heads: int = 1):
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"{channels} channels do not split into {n_heads} heads")
        self.n_heads = n_heads
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, hgt, wid = x.shape
        heads = self.n_heads
        # channel layout of qkv per head: [q (c/heads) | k | v]
        qkv = self.qkv(self.norm(x)).reshape(n, heads, 3 * c // heads, hgt * wid)
        q, k, v = qkv.chunk(3, dim=2)                                # (n, heads, d, L) each
        weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(c), dim=-1)   # (n, heads, L, L)
        attended = (v @ weights.transpose(-1, -2)).reshape(n, c, hgt, wid)
        return x + self.out(attended)


class ResAttnBlock(nn.Module):
    """A ``ResBlock`` (``resblocks``) optionally followed by ``SelfAttention`` (``attention``)."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, use_attention: bool,
                 attn_heads: int, use_affine_time: bool):
        super().__init__()
        self.resblocks = ResBlock(in_ch, out_ch, time_dim, dropout, use_affine_time)
        self.attention = SelfAttention(out_ch, attn_heads) if use_attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.resblocks(x, temb)
        return h if self.attention is None else self.attention(h)


def _downsample(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ch, ch, 3, stride=2, padding=1))


def _upsample(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))


class FaceUNet(nn.Module):
    """The course's face-diffusion UNet; defaults reproduce ``UNet.pt`` (see the module docstring).

    Sub-modules are named ``down1..``, ``mid1``, ``mid2``, ``up1..`` in execution order,
    exactly as in the checkpoint; ``self.down_names`` / ``self.up_names`` hold that order.
    """

    def __init__(self, in_channel: int = 3, channel: int = 128, channel_multiplier: Sequence[int] = (1, 1, 2, 2, 4, 4),
                 n_res_blocks: int = 2, attn_strides: Sequence[int] = (16,), attn_heads: int = 1,
                 use_affine_time: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_channel = in_channel
        self.n_levels = len(channel_multiplier)
        time_dim = channel * 4
        self.time = nn.Sequential(TimeEmbedding(channel), nn.Linear(channel, time_dim), nn.SiLU(),
                                  nn.Linear(time_dim, time_dim))

        def block(cin: int, cout: int, attention: bool) -> ResAttnBlock:
            return ResAttnBlock(cin, cout, time_dim, dropout, attention, attn_heads, use_affine_time)

        down: list[nn.Module] = [nn.Conv2d(in_channel, channel, 3, padding=1)]
        skip_channels = [channel]
        ch = channel
        for level, mult in enumerate(channel_multiplier):
            for _ in range(n_res_blocks):
                down.append(block(ch, channel * mult, 2 ** level in attn_strides))
                ch = channel * mult
                skip_channels.append(ch)
            if level != self.n_levels - 1:
                down.append(_downsample(ch))
                skip_channels.append(ch)

        mid = [block(ch, ch, True), block(ch, ch, False)]

        up: list[nn.Module] = []
        for level in reversed(range(self.n_levels)):
            for _ in range(n_res_blocks + 1):
                cout = channel * channel_multiplier[level]
                up.append(block(ch + skip_channels.pop(), cout, 2 ** level in attn_strides))
                ch = cout
            if level != 0:
                up.append(_upsample(ch))

        self.down_names = [f"down{i + 1}" for i in range(len(down))]
        self.mid_names = [f"mid{i + 1}" for i in range(len(mid))]
        self.up_names = [f"up{i + 1}" for i in range(len(up))]
        for names, modules in ((self.down_names, down), (self.mid_names, mid), (self.up_names, up)):
            for name, module in zip(names, modules):
                self.add_module(name, module)
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, in_channel, 3, padding=1))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (self.n_levels - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channel or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x must be (N, {self.in_channel}, H, W) with H and W divisible by {factor}, "
                             f"got {tuple(x.shape)}")
        time = torch.as_tensor(time, device=x.device)
        if time.dim() == 0:
            time = time.expand(x.shape[0])
        if time.shape != (x.shape[0],):
            raise ValueError(f"time must be a 1-D tensor of {x.shape[0]} timesteps, got shape {tuple(time.shape)}")
        temb = self.time(time)

        h = x
        skips = []
        for name in self.down_names:
            layer = getattr(self, name)
            h = layer(h, temb) if isinstance(layer, ResAttnBlock) else layer(h)
            skips.append(h)
        for name in self.mid_names:
            h = getattr(self, name)(h, temb)
        for name in self.up_names:
            layer = getattr(self, name)
            h = layer(torch.cat([h, skips.pop()], dim=1), temb) if isinstance(layer, ResAttnBlock) else layer(h)
        return self.out(h)


def _extract_state_dict(data, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    if isinstance(data, dict):
        for key in _CONTAINER_KEYS:
            inner = data.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        raise CheckpointError(f"{path} holds a dict with keys {sorted(map(str, data))[:10]} but no state_dict "
                              f"(looked for a bare one and under {list(_CONTAINER_KEYS)})")
    raise CheckpointError(f"{path} holds a {type(data).__name__}; expected a state_dict")


def load_course_unet(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FaceUNet:
    """Build :class:`FaceUNet` and load the course's ``UNet.pt`` into it (strict keys, ``weights_only``).

    Accepts a bare state_dict or a dict holding one under ``state_dict``/``model``/``ema``/...;
    a ``module.`` prefix (from ``DataParallel``) is stripped.  Raises ``CheckpointError``
    naming the file when it is missing, unreadable, or does not fit (missing/unexpected keys).
    The returned model is float32 (the checkpoint's values cast if need be), in eval mode,
    on the device ``map_location`` names.
    """
    path = Path(path)
    data = safe_torch_load(path, "course UNet checkpoint", "the course's UNet.pt state_dict",
                           map_location=map_location)
    state_dict = _extract_state_dict(data, path)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    # Build without random initialisation (every entry is then overwritten by the strict load).
    with torch.device("meta"):
        model = FaceUNet()
    model = model.to_empty(device=map_location)
    load_state_dict_strict(model, state_dict, path)
    return model.eval()
