"""Evaluating generated and real digits.

* ``CourseClassifier`` / ``load_course_grader`` - the course's LeNet-style grader
  (``Classifier.pth``), loaded on any device (the course's own loader asks for cuda).
* ``DigitClassifier`` / ``train_evaluator`` - the project's own evaluator, trained on
  the domain's training split; the default judge of generated digits.
* ``accuracy`` / ``accuracy_by_digit`` / ``folder_accuracy`` - correct / total.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, load_state_dict_strict, safe_torch_load


class CourseClassifier(nn.Module):
    """LeNet: conv(3,6,5)-relu-pool-conv(6,16,5)-relu-pool-fc 256-128-64-10 on 28x28 RGB in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def default_grader_path() -> Path | None:
    """``$HW2_COURSE_GRADER``, else ``../shared/course/Classifier.pth`` beside the repo, if present."""
    from . import paths

    env = os.environ.get("HW2_COURSE_GRADER")
    candidates = [Path(env)] if env else []
    candidates.append(paths.repo_root().parent / "shared" / "course" / "Classifier.pth")
    return next((p for p in candidates if p.is_file()), None)


def load_course_grader(path: str | os.PathLike, device="cpu") -> CourseClassifier:
    """The course grader from ``Classifier.pth`` (a dict with ``state_dict``), on any device."""
    path = Path(path)
    data = safe_torch_load(path, "course grader", "Classifier.pth: a dict with a state_dict")
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"course grader {path} holds no state_dict")
    model = CourseClassifier()
    load_state_dict_strict(model, state, path)
    return model.to(device).eval()


class DigitClassifier(nn.Module):
    """A small CNN evaluator (about 0.1 M parameters) for 28x28 RGB digits in [-1, 1]."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * w, 10),
        )

    def forward(self, x):
        return self.net(x)


def train_evaluator(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int = 3, batch_size: int = 128,
                    lr: float = 3e-3, seed: int = 0, device="cpu", progress: bool = True) -> DigitClassifier:
    """Train ``DigitClassifier`` with light augmentation (random shifts) on images in [-1, 1]."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(train_x)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="training evaluator", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x, y = train_x[idx].to(device), train_y[idx].to(device)
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000, device=None) -> torch.Tensor:
    """Class predictions for images in [-1, 1]."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int, int]:
    """(fraction, correct, total)."""
    pred = predict(model, x)
    correct = int((pred == torch.as_tensor(y)).sum())
    return correct / max(len(y), 1), correct, len(y)


def accuracy_by_digit(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    pred = predict(model, x)
    y = torch.as_tensor(y)
    return {int(d): float((pred[y == d] == d).float().mean()) for d in torch.unique(y)}


SAMPLE_NAME = re.compile(r"^(\d)_(\d{3})\.png$")


def folder_accuracy(folder: str | os.PathLike, model: nn.Module) -> tuple[float, int, int]:
    """The course's way: every ``{digit}_{index:03d}.png``, label from the first character."""
    from .digits import read_png, to_tensor

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if SAMPLE_NAME.match(p.name))
    if not files:
        raise FileNotFoundError(f"{folder} holds no files named {{digit}}_{{index:03d}}.png")
    x = to_tensor(np.stack([read_png(p) for p in files]))
    y = torch.tensor([int(p.name[0]) for p in files])
    return accuracy(model, x, y)
