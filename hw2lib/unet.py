"""A class-conditional UNet for small images (digits at 28x28, faces at 32x32).

Residual blocks (GroupNorm, SiLU, two 3x3 convs; the time + label embedding added
between them) on the down and up paths, self-attention at the resolutions listed
in ``attn_resolutions`` (feature-map sizes, e.g. 7 for the 7x7 bottleneck of a 28x28
input), a sinusoidal time embedding and a learned label embedding with one extra
*null* label (index ``num_classes``) for classifier-free guidance.  No image size is
hard-coded: any size divisible by ``2 ** (len(channel_mults) - 1)`` works.
``num_classes=0`` gives an unconditional model (``labels`` may then be None).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of 0-based integer timesteps: [sin(t w_i), cos(t w_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, added residually."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, base_channels: int = 32, channel_mults=(1, 2, 2),
                 attn_resolutions=(7,), image_size: int = 28, num_classes: int = 10, time_dim: int = 128,
                 num_res_blocks: int = 1, dropout: float = 0.0):
        super().__init__()
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by {factor} for channel_mults {channel_mults}")
        self.image_size, self.num_classes, self.time_dim = image_size, num_classes, time_dim
        self.null_label = num_classes
        emb_dim = time_dim * 4 if time_dim < 64 else time_dim * 2
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.inc = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        chans = [base_channels]
        ch, res = base_channels, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = base_channels * mult
                blocks = nn.ModuleList([ResBlock(ch, out, emb_dim, dropout)])
                if res in attn_resolutions:
                    blocks.append(SelfAttention(out))
                self.down.append(blocks)
                ch = out
                chans.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = SelfAttention(ch)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                blocks = nn.ModuleList([ResBlock(ch + chans.pop(), out, emb_dim, dropout)])
                if res in attn_resolutions:
                    blocks.append(SelfAttention(out))
                self.up.append(blocks)
                ch = out
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((len(x),), self.null_label, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(labels)
        h = self.inc(x)
        hs = [h]
        for blocks in self.down:
            if isinstance(blocks[0], ResBlock):
                h = blocks[0](h, emb)
                for extra in blocks[1:]:
                    h = extra(h)
            else:
                h = blocks[0](h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = blocks[0](torch.cat([h, hs.pop()], dim=1), emb)
                for extra in blocks[1:]:
                    h = extra(h)
            else:
                h = blocks[1](blocks[0](h))
        return self.out(h)


def build_unet(cfg, in_channels: int = 3, num_classes: int | None = None) -> UNet:
    """The UNet a DDPM / DDIM config describes."""
    return UNet(in_channels=in_channels, base_channels=cfg.base_channels, channel_mults=tuple(cfg.channel_mults),
                attn_resolutions=tuple(cfg.attn_resolutions), image_size=cfg.image_size,
                num_classes=getattr(cfg, "num_classes", 0) if num_classes is None else num_classes,
                time_dim=cfg.time_dim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
