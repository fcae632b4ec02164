"""The eta and alpha explorers of notebook ``02_ddim``: ipywidgets sliders that redraw DDIM samples.

Each explorer is a ``VBox`` of a caption, a ``FloatSlider`` (0..1, step 0.05, redrawn on
release: ``continuous_update=False``), an ``ipywidgets.Image`` holding PNG bytes and a
status line.  The noises are fixed when the explorer is built; the PNG drawn for each
slider value is cached, so going back to a value is instant.  ``explorer.slider``,
``explorer.image``, ``explorer.status`` and ``explorer.cache`` are exposed so tests (and
users) can drive them without a browser: ``explorer.slider.value = 0.5`` redraws at once.
"""
from __future__ import annotations

import io
import time
from typing import Callable, Sequence

import ipywidgets as widgets
import numpy as np
import torch

from . import samplers
from .plots import to_uint8_images
from .schedule import NoiseSchedule

SLIDER = dict(min=0.0, max=1.0, step=0.05)
TARGET_PX = 128  # images are enlarged (nearest neighbour) to about this many pixels a side


def png_row(images: torch.Tensor, gap: int = 2, scale: int | None = None) -> bytes:
    """A batch in [-1, 1] (N x 3 x S x S) as one PNG row, enlarged to about ``TARGET_PX`` per image."""
    from PIL import Image

    arr = to_uint8_images(images.clamp(-1, 1))
    n, h, w, c = arr.shape
    scale = scale or max(1, TARGET_PX // max(h, w))
    canvas = np.full((h, n * w + (n - 1) * gap, c), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        canvas[:, i * (w + gap): i * (w + gap) + w] = img
    pil = Image.fromarray(canvas)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _key(value: float) -> float:
    return round(float(value), 4)


class Explorer(widgets.VBox):
    """A caption, a slider, the image and a status line; ``render(v)`` draws (or recalls) value ``v``.

    Attributes: ``slider``, ``image`` (PNG bytes in ``image.value``), ``status``, ``cache``
    (slider value -> PNG bytes), ``last_seconds`` (time of the last redraw) and ``draws``
    (how many times the model was run).
    """

    def __init__(self, name: str, caption: str, draw: Callable[[float], bytes], value: float):
        self.slider = widgets.FloatSlider(value=value, description=name, continuous_update=False, readout=True,
                                          readout_format=".2f", **SLIDER)
        self.image = widgets.Image(format="png")
        self.status = widgets.HTML()
        super().__init__([widgets.HTML(caption), self.slider, self.image, self.status])
        self.param_name, self._draw = name, draw
        self.cache: dict[float, bytes] = {}
        self.last_seconds = 0.0
        self.draws = 0
        self.slider.observe(lambda change: self.render(change["new"]), names="value")
        self.render(self.slider.value)

    def render(self, v: float) -> bytes:
        key = _key(v)
        start = time.perf_counter()
        hit = key in self.cache
        if not hit:
            self.cache[key] = self._draw(key)
            self.draws += 1
        self.image.value = self.cache[key]
        self.last_seconds = time.perf_counter() - start
        self.status.value = (f"<small>{self.param_name} = {key:g}: {'cached' if hit else 'drawn'} in "
                             f"{self.last_seconds:.2f} s ({len(self.cache)} cached)</small>")
        return self.cache[key]


def eta_explorer(eps_model, noises: Sequence[torch.Tensor] | torch.Tensor, schedule: NoiseSchedule, steps: int = 20,
                 convention: str = "ermon", seed: int = 0, device="cpu", value: float = 0.0, caption: str = "",
                 clip_x0: bool | None = None):
    """A slider for eta: the DDIM samples of ``noises`` (one row, left to right) at that eta.

    The fresh noise of eta > 0 is drawn from ``ddim.fresh_noise_generator(seed)``, reset at every
    redraw, so one eta always shows the same images, the same as ``ddim.eta_grid`` draws.
    ``clip_x0``: clip the predicted x_0 to [-1, 1] at each step (None: as ``convention`` does).
    """
    from .ddim import fresh_noise_generator, stack

    x_T = stack(noises).to(device)

    def draw(eta: float) -> bytes:
        gen = fresh_noise_generator(seed, device)
        with torch.inference_mode():
            x = samplers.ddim_sample(eps_model, x_T, schedule, steps=steps, eta=eta, convention=convention,
                                     generator=gen, clip_x0=clip_x0)
        return png_row(x.float().cpu())

    text = caption or f"DDIM, {steps} steps ({convention}); noises 00-{len(x_T) - 1:02d} left to right"
    return Explorer("eta", text, draw, value)


def interpolation_explorer(eps_model, z0: torch.Tensor, z1: torch.Tensor, schedule: NoiseSchedule, steps: int = 20,
                           convention: str = "ermon", device="cpu", value: float = 0.5, caption: str = "",
                           clip_x0: bool | None = None):
    """A slider for alpha: DDIM (eta = 0) samples of slerp(z0, z1, alpha) (left) and lerp (right).

    ``clip_x0`` as in ``eta_explorer``.
    """
    from .ddim import stack

    z0, z1 = stack(z0)[:1].to(device), stack(z1)[:1].to(device)

    def draw(alpha: float) -> bytes:
        x_T = torch.cat([samplers.slerp(z0, z1, alpha), samplers.lerp(z0, z1, alpha)])
        with torch.inference_mode():
            x = samplers.ddim_sample(eps_model, x_T, schedule, steps=steps, eta=0.0, convention=convention,
                                     clip_x0=clip_x0)
        return png_row(x.float().cpu())

    text = caption or f"alpha from noise 00 (0) to 01 (1); left: slerp, right: linear; DDIM {steps} steps, eta 0"
    return Explorer("alpha", text, draw, value)
