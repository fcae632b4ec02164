"""SynDigits-style street-number crops: the offline stand-in for SVHN.

Ganin & Lempitsky (2015) built *SynDigits* as a synthetic SVHN: house numbers of one to
three digits rendered from fonts, "varying the text (one-, two- and three-digit numbers),
positioning, orientation, background and stroke colours, and the amount of blur", and
cropped around one digit so that its neighbours are cut at the left and right borders,
as in SVHN's cropped-digit format. This module follows that recipe with the fonts that
matplotlib ships (plus any ``.ttf`` / ``.otf`` under the system font folders):

1. every digit of every usable font (and a bolder stroke of it) is rendered once with
   PIL at a canonical digit height of ``GLYPH_H`` pixels (``GlyphBank``);
2. each sample is a number of 1-3 (sometimes 4) digits laid out on a canvas with the
   font's advances plus random tracking, the labelled digit at the centre;
3. a random affine view (scale, rotation, shear, horizontal stretch, offset) is
   sampled from the canvas in batches with ``grid_sample`` at 56x56 and averaged down
   to 28x28 (anti-aliasing), along with an optional drop shadow;
4. colours: a background and a stroke colour with a random minimum luminance
   contrast, textured backgrounds (low-frequency noise, brick / grass / gravel
   textures from scikit-image), a plate edge, lighting gradients, then a per-sample
   Gaussian blur and pixel noise.

Everything random comes from ``numpy.random.Generator`` streams derived from the seed
(one per split and batch of ``BATCH`` samples); the torch ops used are element-wise or
gather-based, so a rebuild with the same seed and fonts gives the same bytes.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

GLYPH_H = 40  # canonical digit height (pixels) on the canvas
CANVAS_H, CANVAS_W = 96, 136
BASELINE = CANVAS_H // 2 + GLYPH_H // 2  # digits are vertically centred on the canvas
OUT, HI = 28, 56  # output size and the super-sampled size the masks are drawn at
BATCH = 1000  # samples per random stream; keep fixed, or checksums change
SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "/System/Library/Fonts",
                    "C:/Windows/Fonts")
# fonts without lining digits: symbol / size variants, old-style figures (cmmi), the fallback font
DENY = ("cmsy", "cmex", "cmmi", "lastresort", "stixsiz", "stixnonuni", "display")
TEXTURES = ("brick", "grass", "gravel")


# --------------------------------------------------------------------------- fonts
def font_files() -> list[Path]:
    """Candidate font files: matplotlib's own, then the system's; one file per font name, sorted."""
    import matplotlib

    roots = [Path(matplotlib.get_data_path()) / "fonts" / "ttf"]
    roots += [Path(d) for d in SYSTEM_FONT_DIRS if os.path.isdir(d)]
    seen: dict[str, Path] = {}
    for root in roots:
        for ext in ("ttf", "otf", "TTF", "OTF"):
            for p in sorted(glob.glob(str(root / "**" / f"*.{ext}"), recursive=True)):
                name = Path(p).name.lower()
                if name not in seen and not any(d in name for d in DENY):
                    seen[name] = Path(p)
    return [seen[k] for k in sorted(seen)]


@dataclass
class Glyph:
    ink: np.ndarray  # uint8 CANVAS_H x w, rows in canvas coordinates (baseline at BASELINE)
    x0: int  # left edge of the ink relative to the pen position
    advance: float
    cy: float  # vertical centre of the ink (canvas rows)


@dataclass
class GlyphBank:
    fonts: list[str] = field(default_factory=list)  # one entry per variant: "<file>[+bold]"
    glyphs: list[list[Glyph]] = field(default_factory=list)  # [variant][digit]


def _render_font(path: Path, stroke: float) -> list[Glyph] | None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        probe = ImageFont.truetype(str(path), 100)
        _, top8, _, bottom8 = probe.getbbox("8", anchor="ls")
        if bottom8 - top8 < 10:
            return None
        size = max(8, int(round(100 * GLYPH_H / (bottom8 - top8))))
        font = ImageFont.truetype(str(path), size)
    except Exception:  # unreadable or not a font PIL understands: skip it
        return None
    sw = int(round(stroke * GLYPH_H))
    glyphs = []
    for ch in "0123456789":
        left, top, right, bottom = font.getbbox(ch, anchor="ls", stroke_width=sw)
        if right <= left or bottom <= top:
            return None
        im = Image.new("L", (right - left + 4, CANVAS_H), 0)
        ImageDraw.Draw(im).text((2 - left, BASELINE), ch, font=font, fill=255, anchor="ls", stroke_width=sw,
                                stroke_fill=255)
        ink = np.asarray(im, dtype=np.uint8)
        rows = np.flatnonzero(ink.max(1) > 32)
        cols = np.flatnonzero(ink.max(0) > 0)
        if len(rows) == 0 or len(cols) == 0:
            return None
        ink = np.ascontiguousarray(ink[:, cols[0]:cols[-1] + 1])
        glyphs.append(Glyph(ink, int(left - 2 + cols[0]), float(font.getlength(ch)) + 2 * sw, (rows[0] + rows[-1]) / 2))
    return glyphs


def _looks_like_digits(glyphs: list[Glyph], reference: list[Glyph] | None) -> bool:
    """Reject fonts whose digits are all the same box (missing glyphs) or that do not read as 0..9."""
    def vec(g: Glyph) -> np.ndarray:
        rows = np.flatnonzero(g.ink.max(1) > 0)
        crop = torch.from_numpy(g.ink[rows[0]:rows[-1] + 1].astype(np.float32))[None, None]
        v = F.interpolate(crop, size=(24, 16), mode="bilinear", align_corners=False).flatten()
        return (v / (v.norm() + 1e-6)).numpy()

    vs = np.stack([vec(g) for g in glyphs])
    sims = vs @ vs.T
    if (sims[np.triu_indices(10, 1)] > 0.97).any():
        return False
    if reference is None:
        return True
    ref = np.stack([vec(g) for g in reference])
    return int(((vs @ ref.T).argmax(1) == np.arange(10)).sum()) >= 8


def glyph_bank(fonts: list[Path] | None = None, bold: bool = True) -> GlyphBank:
    """Render 0..9 of every usable font once (and a bolder stroke of each)."""
    fonts = font_files() if fonts is None else fonts
    rendered = {p: _render_font(p, 0.0) for p in fonts}
    ref_path = next((p for p in fonts if p.name == "DejaVuSans.ttf"), None)
    reference = rendered.get(ref_path) if ref_path else None
    bank = GlyphBank()
    for p in fonts:
        g = rendered[p]
        if g is None or not _looks_like_digits(g, reference):
            continue
        bank.fonts.append(p.name)
        bank.glyphs.append(g)
        if bold and "bold" not in p.name.lower():
            gb = _render_font(p, 0.05)
            if gb is not None:
                bank.fonts.append(p.name + "+stroke")
                bank.glyphs.append(gb)
    if not bank.glyphs:
        from .digits import DataError

        raise DataError("no usable font found (matplotlib's fonts/ttf is missing?); cannot build the offline SVHN")
    return bank


# --------------------------------------------------------------------------- layout
def compose_numbers(bank: GlyphBank, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canvases (N x CANVAS_H x CANVAS_W uint8) holding a 1-4 digit number with digit ``labels[i]`` at the centre,
    and each centre digit's vertical ink centre."""
    n = len(labels)
    canvas = np.zeros((n, CANVAS_H, CANVAS_W), np.uint8)
    cys = np.empty(n, np.float32)
    variant = rng.integers(len(bank.glyphs), size=n)
    length = rng.choice([1, 2, 3, 4], p=[0.15, 0.4, 0.35, 0.1], size=n)
    position = (rng.random(n) * length).astype(int)
    others = rng.integers(10, size=(n, 4))
    track = rng.uniform(-0.04, 0.3, size=n) * GLYPH_H
    for i in range(n):
        glyphs = bank.glyphs[variant[i]]
        number = others[i, :length[i]].copy()
        number[position[i]] = labels[i]
        j = position[i]
        c = glyphs[number[j]]
        pens = {j: CANVAS_W / 2 - (c.x0 + c.ink.shape[1] / 2)}
        for k in range(j + 1, length[i]):
            pens[k] = pens[k - 1] + glyphs[number[k - 1]].advance + track[i]
        for k in range(j - 1, -1, -1):
            pens[k] = pens[k + 1] - glyphs[number[k]].advance - track[i]
        for k, pen in pens.items():
            g = glyphs[number[k]]
            x = int(round(pen + g.x0))
            a, b = max(x, 0), min(x + g.ink.shape[1], CANVAS_W)
            if a < b:
                np.maximum(canvas[i, :, a:b], g.ink[:, a - x:b - x], out=canvas[i, :, a:b])
        cys[i] = c.cy
    return canvas, cys


def _view_grid(n: int, cys: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Per-sample affine views, output (HI x HI) -> canvas, as grid_sample grids."""
    frac = 0.56 + 0.36 * rng.beta(2.0, 2.0, size=n)  # digit height / crop side
    s = GLYPH_H / (2 * frac)  # canvas pixels per unit of the [-1, 1] output square
    theta = np.deg2rad(rng.normal(0, 5, size=n).clip(-15, 15))
    shear = rng.normal(0, 0.1, size=n).clip(-0.3, 0.3)
    stretch = np.exp(rng.uniform(np.log(0.8), np.log(1.3), size=n))
    tx = rng.uniform(-0.1, 0.1, size=n) * s
    ty = rng.uniform(-0.07, 0.07, size=n) * s
    cos, sin = np.cos(theta), np.sin(theta)
    # output -> canvas: rotate . shear . 1/stretch in x, times the scale
    m = np.empty((n, 2, 2))
    m[:, 0, 0] = cos / stretch
    m[:, 0, 1] = cos * shear - sin
    m[:, 1, 0] = sin / stretch
    m[:, 1, 1] = sin * shear + cos
    m = (m * s[:, None, None]).astype(np.float32)
    u = ((np.arange(HI) + 0.5) / HI * 2 - 1).astype(np.float32)
    uu, vv = np.meshgrid(u, u)  # uu varies along columns (x), vv along rows (y)
    cx = (CANVAS_W / 2 + tx).astype(np.float32)[:, None, None]
    cy = (cys + ty).astype(np.float32)[:, None, None]
    px = cx + m[:, 0, 0, None, None] * uu + m[:, 0, 1, None, None] * vv
    py = cy + m[:, 1, 0, None, None] * uu + m[:, 1, 1, None, None] * vv
    grid = np.stack([(px + 0.5) * (2 / CANVAS_W) - 1, (py + 0.5) * (2 / CANVAS_H) - 1], axis=-1)
    return torch.from_numpy(grid)


# --------------------------------------------------------------------------- colours and textures
def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    import matplotlib.colors as mcolors

    return mcolors.hsv_to_rgb(np.stack([h, s, v], axis=-1))


# hues of house-number plates and walls: browns, beiges, blues, greens, reds, a few purples
HUE_CENTRES = np.array([0.07, 0.13, 0.58, 0.33, 0.0, 0.78])
HUE_WEIGHTS = np.array([0.3, 0.15, 0.25, 0.1, 0.12, 0.08])


def _hues(n: int, rng: np.random.Generator) -> np.ndarray:
    return (HUE_CENTRES[rng.choice(len(HUE_CENTRES), p=HUE_WEIGHTS, size=n)] + rng.normal(0, 0.04, n)) % 1.0


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plate, stroke and wall colours (N x 3 in [0, 1]); stroke and plate differ in luminance by a random minimum."""
    bg = _hsv_to_rgb(_hues(n, rng), rng.random(n) ** 2 * 0.6, rng.uniform(0.1, 0.95, n))
    fg = _hsv_to_rgb(_hues(n, rng), rng.random(n) ** 2 * 0.7, rng.uniform(0.0, 1.0, n))
    wall = _hsv_to_rgb(_hues(n, rng), rng.random(n) ** 2 * 0.5, rng.uniform(0.05, 0.95, n))
    lb, lf = _luminance(bg), _luminance(fg)
    contrast = rng.uniform(0.15, 0.65, n)
    can_up, can_down = lb + contrast <= 1, lb - contrast >= 0
    lighter = np.where(can_up & can_down, rng.random(n) < 0.5, can_up | (~can_down & (lb < 0.5)))
    target = np.where(lighter, np.minimum(lb + contrast, 1.0), np.maximum(lb - contrast, 0.0))
    ok = np.where(lighter, lf >= target, lf <= target)
    t_up = ((target - lf) / np.maximum(1 - lf, 1e-6)).clip(0, 1)[:, None]  # mix with white
    k_dn = (target / np.maximum(lf, 1e-6)).clip(0, 1)[:, None]  # darken
    adjusted = np.where((target > lf)[:, None], fg + (1 - fg) * t_up, fg * k_dn)
    fg = np.where(ok[:, None], fg, adjusted)
    return bg.astype(np.float32), fg.astype(np.float32), wall.astype(np.float32)


_TEXTURE_CACHE: list[torch.Tensor] = []


def _textures() -> torch.Tensor:
    """scikit-image's grey brick / grass / gravel textures, zero-mean unit-std, T x 1 x 512 x 512."""
    if not _TEXTURE_CACHE:
        import skimage.data

        for name in TEXTURES:
            t = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)  # numpy: reductions independent of
            t = ((t - t.mean()) / (t.std() + 1e-6)).astype(np.float32)  # torch's thread count
            _TEXTURE_CACHE.append(torch.from_numpy(t)[None, None])
    return torch.cat(_TEXTURE_CACHE)


def _texture_patches(n: int, rng: np.random.Generator, use: np.ndarray) -> np.ndarray:
    """N x 1 x OUT x OUT random crops (scale, angle, place) of the textures; zeros where ``use`` is False."""
    tex = _textures()
    which = np.where(use, rng.integers(len(tex), size=n), -1)
    side = rng.uniform(0.05, 0.25, size=n).astype(np.float32)  # crop side as a fraction of the texture
    ang = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    cx, cy = rng.uniform(-0.7, 0.7, size=(2, n)).astype(np.float32)
    u = ((np.arange(OUT) + 0.5) / OUT * 2 - 1).astype(np.float32)
    uu, vv = np.meshgrid(u, u)
    c, s = (np.cos(ang) * side)[:, None, None], (np.sin(ang) * side)[:, None, None]
    grid = torch.from_numpy(np.stack([cx[:, None, None] + c * uu - s * vv, cy[:, None, None] + s * uu + c * vv], -1))
    out = torch.zeros(n, 1, OUT, OUT)
    for t in range(len(tex)):
        idx = torch.from_numpy(np.flatnonzero(which == t))
        if len(idx):
            out[idx] = F.grid_sample(tex[t:t + 1].expand(len(idx), -1, -1, -1), grid[idx], mode="bilinear",
                                     padding_mode="reflection", align_corners=False)
    return out.numpy()


def _gaussian_blur(x: np.ndarray, sigma: np.ndarray, radius: int = 3) -> np.ndarray:
    """Separable per-sample Gaussian blur of N x C x H x W (sigma 0 = identity), as shifted sums."""
    k = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (k[None, :] / np.maximum(sigma[:, None], 1e-3)) ** 2)
    w = (w / w.sum(1, keepdims=True)).astype(np.float32)[:, :, None, None, None]
    h, wd = x.shape[-2:]
    p = np.pad(x, ((0, 0), (0, 0), (0, 0), (radius, radius)), mode="edge")
    x = w[:, 0] * p[..., 0:wd]
    for i in range(1, 2 * radius + 1):
        x += w[:, i] * p[..., i:i + wd]
    p = np.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    x = w[:, 0] * p[..., 0:h, :]
    for i in range(1, 2 * radius + 1):
        x += w[:, i] * p[..., i:i + h, :]
    return x


def _per(a: np.ndarray) -> np.ndarray:
    """A per-sample value broadcast over C x H x W."""
    return np.asarray(a, dtype=np.float32)[:, None, None, None]


# --------------------------------------------------------------------------- one batch
def render_batch(bank: GlyphBank, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 N x 28 x 28 x 3 street-number crops centred on the digits ``labels``."""
    n = len(labels)
    canvas, cys = compose_numbers(bank, labels, rng)
    grid = _view_grid(n, cys, rng)
    src = torch.from_numpy(canvas)[:, None].float().div_(255.0)
    mask = F.avg_pool2d(F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False), 2)
    # drop shadow (raised or engraved numbers): the same view, offset by a few canvas pixels
    has_shadow = rng.random(n) < 0.3
    ang = rng.uniform(0, 2 * np.pi, n)
    dist = rng.uniform(1.5, 4.0, n) * (GLYPH_H / OUT)
    off = np.stack([np.cos(ang) * dist * 2 / CANVAS_W, np.sin(ang) * dist * 2 / CANVAS_H], -1)
    sh_idx = torch.from_numpy(np.flatnonzero(has_shadow))
    shadow = np.zeros((n, 1, OUT, OUT), np.float32)
    if len(sh_idx):
        g = grid[sh_idx] - torch.from_numpy(off[has_shadow].astype(np.float32))[:, None, None]
        shadow[has_shadow] = F.avg_pool2d(F.grid_sample(src[sh_idx], g, mode="bilinear", padding_mode="zeros",
                                                        align_corners=False), 2).numpy()
    shadow *= _per(rng.uniform(0.3, 0.7, n))
    mask = mask.numpy()

    bg, fg, wall = _colours(n, rng)
    u = ((np.arange(OUT) + 0.5) / OUT * 2 - 1).astype(np.float32)
    uu, vv = np.meshgrid(u, u)

    # plate: its colour with low-frequency blotches and (half the time) a photographed texture
    coarse = torch.from_numpy(rng.standard_normal((n, 3, 4, 4), dtype=np.float32))
    coarse = F.interpolate(coarse, size=(OUT, OUT), mode="bicubic", align_corners=False).numpy()
    amp_c = _per(rng.uniform(0.0, 0.08, n) * (rng.random(n) < 0.7))
    textured = rng.random(n) < 0.5
    amp_t = _per(rng.uniform(0.02, 0.08, n) * textured)
    tex = _texture_patches(n, rng, textured)
    back = bg[:, :, None, None] * (1 + amp_c * coarse) + amp_t * tex
    # a plate edge: beyond a line near the border, the wall behind the plate
    edge = np.flatnonzero(rng.random(n) < 0.25)
    phi = rng.uniform(0, 2 * np.pi, n)[edge, None, None]
    dist_e = rng.uniform(0.55, 0.95, n)[edge, None, None]
    side = 1 / (1 + np.exp(-(np.cos(phi) * uu + np.sin(phi) * vv - dist_e) / 0.04))
    side = side.astype(np.float32)[:, None]
    back[edge] = back[edge] * (1 - side) + (wall[edge, :, None, None] * (1 + 0.1 * coarse[edge, ::-1])
                                            + amp_t[edge] * tex[edge, ..., ::-1]) * side

    # stroke: a flat colour with a slight tint gradient, over the (shadowed) plate
    tint = rng.normal(0, 0.06, (n, 3, 2)).astype(np.float32)
    stroke = fg[:, :, None, None] * (1 + tint[..., 0, None, None] * uu + tint[..., 1, None, None] * vv)
    img = back * (1 - shadow)
    img += mask * (stroke - img)
    # lighting: a linear gradient and an overall exposure
    gx, gy = rng.normal(0, 0.12, (2, n)).astype(np.float32)
    img *= (1 + gx[:, None, None] * uu + gy[:, None, None] * vv)[:, None] * _per(rng.uniform(0.85, 1.15, n))

    sigma = rng.uniform(0.2, 1.2, n) + (rng.random(n) < 0.1) * rng.uniform(0.3, 0.8, n)
    img = _gaussian_blur(img, sigma)
    img += _per(rng.uniform(0.0, 0.035, n)) * rng.standard_normal((n, 3, OUT, OUT), dtype=np.float32)
    img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- the dataset
def balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % 10).astype(np.int64)


def generate(bank: GlyphBank, n: int, seed: int, stream: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops with balanced labels; batch ``b`` draws from ``default_rng([seed, stream, b])``."""
    from tqdm.auto import tqdm

    labels = balanced_labels(n, np.random.default_rng([seed, stream]))
    images = np.empty((n, OUT, OUT, 3), np.uint8)
    starts = range(0, n, BATCH)
    for b, start in enumerate(tqdm(starts, desc=f"rendering SynDigits ({n})", leave=False, disable=not progress)):
        stop = min(start + BATCH, n)
        images[start:stop] = render_batch(bank, labels[start:stop], np.random.default_rng([seed, stream, b]))
    return images, labels


def build_syndigits(seed: int, n_train: int = 24000, n_val: int = 4000, progress: bool = True):
    """The offline SVHN: ``({"train": (images, labels), "val": (...)}, info)`` as ``digits.build_offline`` expects."""
    from .digits import _versions

    bank = glyph_bank()
    splits = {"train": generate(bank, n_train, seed, 4, progress), "val": generate(bank, n_val, seed, 5, progress)}
    info = {
        "recipe": "SynDigits (Ganin & Lempitsky 2015) style: 1-4 digit house numbers rendered from fonts, cropped "
                  "around the centre digit (neighbours cut at the borders), random background/stroke colours with a "
                  "minimum contrast, textures (noise, scikit-image brick/grass/gravel), plate edges, drop shadows, "
                  "rotation, shear, stretch, scale, offset, lighting, Gaussian blur and pixel noise; balanced labels",
        "fonts": bank.fonts,
        "textures": list(TEXTURES),
        "packages": _versions("matplotlib", "pillow", "scikit-image", "numpy", "torch"),
    }
    return splits, info
