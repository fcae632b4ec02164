"""DANN: domain-adversarial training of neural networks (Ganin & Lempitsky 2015; Ganin et al. 2016, JMLR).

* ``GradReverse`` / ``grad_reverse`` - the gradient reversal layer: identity forward,
  ``-lambda * grad`` backward.  ``lambda`` is an argument, never state of the layer:
  ``lambda_schedule(p, gamma)`` = 2 / (1 + exp(-gamma p)) - 1 is computed by the training
  loop from the progress ``p`` in [0, 1] and logged with every epoch.
* ``DANNModel`` - feature extractor, label classifier and domain classifier (one logit,
  BCE with logits: source 0, target 1); ``forward`` runs one pass over the concatenated
  source + target batch.
* ``train`` - one loop for the three modes: ``source-only`` (lower bound), ``dann`` and
  ``target-only`` (upper bound, trained on the target's training split).  Loaders of
  different lengths are paired by cycling the shorter one (``paired``).
* ``evaluate`` - accuracy on the target's validation split as ``Accuracy(correct, total)``.
* ``embed_tsne`` / ``proxy_a_distance`` - the analysis the notebook shows.
* ``add_cli`` / ``main_predict`` - ``python -m hw2lib dann-predict TEST_DIR OUT_CSV``.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, paths

SOURCE = "mnistm"
TARGETS = ("svhn", "usps")
MODES = ("source-only", "dann", "target-only")
TARGET_TITLES = {"svhn": "MNIST-M → SVHN", "usps": "MNIST-M → USPS"}
MODE_TITLES = {"source-only": "source-only", "dann": "DANN", "target-only": "target-only"}

# Config keys a resumed or reused checkpoint must share with the run that wants it.
RESUME_KEYS = ("source", "seed", "epochs", "batch_size", "optimizer", "lr", "lr_anneal", "weight_decay", "gamma",
               "lambda_max", "max_train", "conv_channels", "batch_norm", "hidden", "domain_layers", "dropout",
               "ema_decay")


# Beyond the config: what a checkpoint's run was (mode, target and the data it was trained on).
RUN_KEYS = ("mode", "target", "data_source", "data_checksum")


# --------------------------------------------------------------------------- gradient reversal
class GradReverse(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-lambd`` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output * (-ctx.lambd), None


def grad_reverse(x: torch.Tensor, lambd: float) -> torch.Tensor:
    return GradReverse.apply(x, lambd)


def lambda_schedule(p: float, gamma: float = 10.0) -> float:
    """DANN's adaptation factor 2 / (1 + exp(-gamma p)) - 1: 0 at p = 0, towards 1 as p -> 1."""
    p = min(max(float(p), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def lr_at(p: float, lr0: float, anneal: bool = True, alpha: float = 10.0, beta: float = 0.75) -> float:
    """DANN's learning-rate annealing lr0 / (1 + alpha p) ** beta (constant when ``anneal`` is False)."""
    return lr0 / (1.0 + alpha * min(max(p, 0.0), 1.0)) ** beta if anneal else lr0


def domain_accuracy(logits: torch.Tensor, is_target: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of the domain classifier: a logit > 0 says "target" (label 1)."""
    pred = (logits.detach().reshape(-1) > 0).to(torch.int64)
    truth = is_target.detach().reshape(-1).to(torch.int64)
    return int((pred == truth).sum()), int(truth.numel())


# --------------------------------------------------------------------------- model
class DANNModel(nn.Module):
    """Feature extractor G_f, label classifier G_y and domain classifier G_d for 28x28 RGB digits.

    The default sizes are the paper's MNIST -> MNIST-M network (conv 32 - conv 48, 768
    features, heads of 100 units); ``batch_norm`` and wider ``conv_channels`` make the
    larger variant the ``full`` profile uses.
    """

    def __init__(self, conv_channels: Iterable[int] = (32, 48), batch_norm: bool = False, hidden: int = 100,
                 dropout: float = 0.5, num_classes: int = 10, domain_layers: int = 1):
        super().__init__()
        conv_channels = tuple(int(c) for c in conv_channels)
        layers: list[nn.Module] = []
        c_in, size = 3, 28
        pad = 0 if len(conv_channels) <= 2 else 2  # two 5x5 convs without padding, or more with padding
        for i, c in enumerate(conv_channels):
            layers.append(nn.Conv2d(c_in, c, 5, padding=pad))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            if i == len(conv_channels) - 1 and dropout > 0:
                layers.append(nn.Dropout2d(dropout))
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            size = (size + 2 * pad - 4) // 2
            c_in = c
            if size < 1:
                raise ValueError(f"conv_channels {conv_channels} shrink 28x28 images to nothing")
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_dim = c_in * size * size

        def head(out: int, depth: int) -> nn.Sequential:
            mods: list[nn.Module] = []
            d = self.feature_dim
            for _ in range(depth):
                mods += [nn.Linear(d, hidden)]
                if batch_norm:
                    mods.append(nn.BatchNorm1d(hidden))
                mods.append(nn.ReLU(inplace=True))
                d = hidden
            mods.append(nn.Linear(d, out))
            return nn.Sequential(*mods)

        self.label_classifier = head(num_classes, 2)
        self.domain_classifier = head(1, domain_layers)

    @classmethod
    def from_config(cls, cfg) -> DANNModel:
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(conv_channels=get("conv_channels", (32, 48)), batch_norm=bool(get("batch_norm", False)),
                   hidden=int(get("hidden", 100)), dropout=float(get("dropout", 0.5)),
                   domain_layers=int(get("domain_layers", 1)))

    def forward(self, x: torch.Tensor, lambd: float = 0.0, n_labelled: int | None = None, domain: bool = True):
        """One pass over ``x`` (the concatenated source + target batch).

        Returns (class logits of the first ``n_labelled`` rows, domain logits of all rows
        behind a gradient reversal of strength ``lambd`` (None when ``domain`` is False), features).
        """
        f = self.features(x)
        n = len(x) if n_labelled is None else n_labelled
        class_logits = self.label_classifier(f[:n])
        domain_logits = self.domain_classifier(grad_reverse(f, lambd)).squeeze(1) if domain else None
        return class_logits, domain_logits, f

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.label_classifier(self.features(x))


# --------------------------------------------------------------------------- data
class Batches:
    """Shuffled mini-batches over in-memory tensors; a new order on every ``iter`` (seeded)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise ValueError("cannot make batches of an empty set")
        self.x, self.y, self.batch_size, self.shuffle = x, y, int(batch_size), shuffle
        self.generator = torch.Generator().manual_seed(int(seed))
        # full batches only while there are enough images (equal halves keep batch statistics comparable)
        self.drop_last = len(x) >= self.batch_size

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def paired(a, b) -> Iterator[tuple[Any, Any]]:
    """Pairs of batches from two loaders for max(len(a), len(b)) steps, restarting the shorter one."""
    steps = max(len(a), len(b))
    it_a, it_b = iter(a), iter(b)
    for _ in range(steps):
        try:
            batch_a = next(it_a)
        except StopIteration:
            it_a = iter(a)
            batch_a = next(it_a)
        try:
            batch_b = next(it_b)
        except StopIteration:
            it_b = iter(b)
            batch_b = next(it_b)
        yield batch_a, batch_b


@dataclass
class Split:
    """One domain's split as tensors (x float32 N x 3 x 28 x 28 in [-1, 1], y int64)."""

    domain: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    source: str
    checksum: str = ""  # of the data it came from (the dataset manifest's), so checkpoints know their data

    def __len__(self) -> int:
        return len(self.y)


def _subset(ds, cap: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .digits import to_tensor

    images, labels = ds.images, ds.labels
    if cap is not None and cap < len(labels):
        idx = np.sort(np.random.default_rng([seed, len(labels)]).permutation(len(labels))[:cap])
        images, labels = images[idx], labels[idx]
    return to_tensor(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))


def load_data(cfg) -> dict[str, dict[str, Split]]:
    """``{domain: {"train": Split, "val": Split}}`` for the source and every target of ``cfg``."""
    from .digits import load_domain

    data: dict[str, dict[str, Split]] = {}
    for domain in (cfg.source, *cfg.targets):
        data[domain] = {}
        for split, cap in (("train", cfg.max_train), ("val", cfg.max_eval)):
            ds = load_domain(domain, split, source=cfg.data_source, data_root=cfg.data_root)
            x, y = _subset(ds, cap, cfg.seed)
            data[domain][split] = Split(domain, split, x, y, ds.source, str(ds.manifest.get("checksum", "")))
    return data


def data_source_of(data: dict[str, dict[str, Split]]) -> str:
    """"offline", "course", ... or "mnistm: course, svhn: torchvision, ..." when they differ."""
    by_domain = {d: s["train"].source for d, s in data.items()}
    if len(set(by_domain.values())) == 1:
        return next(iter(by_domain.values()))
    return ", ".join(f"{d}: {s}" for d, s in by_domain.items())


def describe_data(data: dict[str, dict[str, Split]]) -> list[dict[str, Any]]:
    return [{"domain": d, "source": s["train"].source, "train": len(s["train"]), "val": len(s["val"])}
            for d, s in data.items()]


# --------------------------------------------------------------------------- training
@dataclass
class Accuracy:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{self.value:.4f} ({self.correct}/{self.total})"

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.value, "correct": self.correct, "total": self.total}


@dataclass
class TrainResult:
    mode: str
    target: str
    model: DANNModel
    history: list[dict[str, float]] = field(default_factory=list)
    accuracy: Accuracy | None = None
    seconds: float = 0.0
    resumed_from_epoch: int = 0


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device="cpu", batch_size: int = 1000) -> Accuracy:
    """Label accuracy of ``model`` on (x, y) as correct / total."""
    pred = predict(model, x, device, batch_size)
    return Accuracy(int((pred == y.cpu()).sum()), len(y))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device="cpu", batch_size: int = 1000) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model.classify(x[i:i + batch_size].to(device)).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


@torch.no_grad()
def extract_features(model: DANNModel, x: torch.Tensor, device="cpu", batch_size: int = 1000) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = [model.features(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def checkpoint_path(target: str, mode: str, profile: str, seed: int | None = None) -> Path:
    """``checkpoints/dann_<target>_<profile>.pt`` for DANN (what ``dann-predict`` reads);
    ``dann_<target>_<mode>_<profile>.pt`` for the two bounds; with ``seed`` (the extra seeds of
    ``seed_spread``) ``dann_<target>_<mode>_<profile>_seed<seed>.pt``."""
    if seed is not None:
        return paths.checkpoints_dir() / f"dann_{target}_{mode}_{profile}_seed{int(seed)}.pt"
    name = f"dann_{target}_{profile}.pt" if mode == "dann" else f"dann_{target}_{mode}_{profile}.pt"
    return paths.checkpoints_dir() / name


def _resume_config(cfg) -> dict[str, Any]:
    from .config import as_dict

    d = as_dict(cfg)
    return {k: d.get(k) for k in RESUME_KEYS}


def train(mode: str, cfg, data: dict[str, dict[str, Split]], target: str, device="cpu",
          ckpt: str | Path | None = None, progress: bool = True, log=print,
          stop_after: int | None = None) -> TrainResult:
    """Train one model in ``mode`` (source-only | dann | target-only) for ``cfg.epochs`` epochs.

    * source-only: label loss on source batches;
    * dann: one forward over [source; target] batches, label loss on the source half, domain
      loss (BCE with logits, source 0 / target 1) on both halves behind the reversal layer
      with lambda = ``lambda_schedule(p, cfg.gamma)``; an epoch is a pass over the longer of
      the two loaders, the shorter one restarts;
    * target-only: label loss on the target's training split.

    The history has one row per epoch: label loss / accuracy (training batches), domain loss
    and domain-classifier accuracy (dann only; NaN otherwise), lambda and lr at the end of
    the epoch, accuracy on the target's validation split, seconds.  With ``ckpt`` the state
    is saved after every epoch and a run of the same config resumes from it (a finished one
    is reused as it is); ``stop_after`` ends the call after that many epochs (schedules still
    run to ``cfg.epochs``).

    Under ``torchrun`` (torch.distributed initialised) the model is wrapped in
    DistributedDataParallel: every rank draws the same global batches of ``cfg.batch_size``
    and trains on its slice, the history sums over all ranks, and only rank 0 writes the
    checkpoint, so a run resumes with any number of processes.
    """
    from tqdm.auto import tqdm

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {list(MODES)}")
    from .diffusion import world_info

    device = torch.device(device)
    world, rank = world_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    seed = int(cfg.seed) + 1000 * MODES.index(mode) + 100 * (list(TARGETS).index(target) if target in TARGETS else 9)
    torch.manual_seed(seed)
    model = DANNModel.from_config(cfg).to(device)
    ema_decay = float(getattr(cfg, "ema_decay", 0.0) or 0.0)
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    # the evaluated (and returned, saved, predicted-with) model: an exponential moving average of the weights
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay > 0 else model
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam' or 'sgd'")

    src, tgt, tgt_val = data[cfg.source]["train"], data[target]["train"], data[target]["val"]
    src_loader = Batches(src.x, src.y, cfg.batch_size, seed=seed + 1)
    tgt_loader = Batches(tgt.x, tgt.y, cfg.batch_size, seed=seed + 2)
    if world > 1 and not (src_loader.drop_last and tgt_loader.drop_last):
        raise ValueError(f"distributed training needs at least batch_size ({cfg.batch_size}) training images per "
                         f"domain; {cfg.source} has {len(src)}, {target} has {len(tgt)}")
    steps_per_epoch = {"source-only": len(src_loader), "target-only": len(tgt_loader),
                       "dann": max(len(src_loader), len(tgt_loader))}[mode]
    total_steps = steps_per_epoch * cfg.epochs

    history: list[dict[str, float]] = []
    start_epoch, spent = 0, 0.0
    expect = {**_resume_config(cfg), "mode": mode, "target": target, "data_source": src.source,
              "data_checksum": f"{src.checksum}|{tgt.checksum}"}
    ckpt = Path(ckpt) if ckpt else None
    if ckpt is not None and ckpt.is_file():
        try:
            state = checkpoint.load(ckpt, expect_config=expect, keys=list(expect))
            checkpoint.load_state_dict_strict(model, state.get("train_model", state["model"]), ckpt)
            if ema is not model:
                checkpoint.load_state_dict_strict(ema, state["model"], ckpt)
            opt.load_state_dict(state["optimizer"])
            src_loader.generator.set_state(state["loader_rng"][0])
            tgt_loader.generator.set_state(state["loader_rng"][1])
            checkpoint.set_rng_state(state["rng"])
            history = [dict(h) for h in state["history"]]
            start_epoch, spent = int(state["step"]), float(state.get("seconds", 0.0))
            if rank == 0:
                log(f"{mode} -> {target}: resumed from {ckpt.name} after epoch {start_epoch}/{cfg.epochs}")
        except (checkpoint.CheckpointError, KeyError) as exc:
            if rank == 0:
                log(f"{mode} -> {target}: not resuming from {ckpt} ({exc}); training from scratch")
            start_epoch, history = 0, []
    resumed_from = start_epoch
    net: nn.Module = model
    if world > 1:  # after a resume: DDP broadcasts rank 0's weights and averages the gradients
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=mode != "dann")  # the bounds skip the domain head
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + int(stop_after))

    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc=f"{mode} → {target}",
               disable=not progress or rank != 0, leave=False)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, end_epoch):
        model.train()
        e0 = time.perf_counter()
        sums = {"label_loss": 0.0, "domain_loss": 0.0}
        n_lab = correct_lab = n_dom = correct_dom = 0
        if mode == "dann":
            batches: Iterable = paired(src_loader, tgt_loader)
        elif mode == "source-only":
            batches = ((b, None) for b in src_loader)
        else:
            batches = ((b, None) for b in tgt_loader)
        lambd = lr = 0.0
        for (xa, ya), other in batches:
            p = step / max(total_steps, 1)
            lambd = cfg.lambda_max * lambda_schedule(p, cfg.gamma) if mode == "dann" else 0.0
            lr = lr_at(p, cfg.lr, cfg.lr_anneal)
            for g in opt.param_groups:
                g["lr"] = lr
            if world > 1:  # every rank drew the same global batch: train on this rank's slice
                xa, ya = xa[mine], ya[mine]
                other = (other[0][mine], other[1][mine]) if other is not None else None
            xa, ya = xa.to(device, non_blocking=True), ya.to(device, non_blocking=True)
            if mode == "dann":
                xb = other[0].to(device, non_blocking=True)
                x = torch.cat([xa, xb])
                is_target = torch.cat([torch.zeros(len(xa), device=device), torch.ones(len(xb), device=device)])
                class_logits, domain_logits, _ = net(x, lambd, n_labelled=len(xa))
                label_loss = F.cross_entropy(class_logits, ya)
                domain_loss = F.binary_cross_entropy_with_logits(domain_logits, is_target)
                loss = label_loss + domain_loss
                c, t = domain_accuracy(domain_logits, is_target)
                correct_dom += c
                n_dom += t
                sums["domain_loss"] += domain_loss.item() * t
            else:
                class_logits, _, _ = net(xa, domain=False)
                label_loss = F.cross_entropy(class_logits, ya)
                loss = label_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not model:
                _ema_update(ema, model, ema_decay)
            sums["label_loss"] += label_loss.item() * len(ya)
            correct_lab += int((class_logits.detach().argmax(1) == ya).sum())
            n_lab += len(ya)
            step += 1
            bar.update(1)
        if world > 1:  # the history counts every rank's images
            n_lab, correct_lab, n_dom, correct_dom, sums = _sum_over_ranks(n_lab, correct_lab, n_dom, correct_dom,
                                                                           sums, device)
        val = evaluate(ema, tgt_val.x, tgt_val.y, device)
        row = {
            "epoch": epoch + 1,
            "label_loss": sums["label_loss"] / max(n_lab, 1),
            "label_acc": correct_lab / max(n_lab, 1),
            "domain_loss": sums["domain_loss"] / n_dom if n_dom else float("nan"),
            "domain_acc": correct_dom / n_dom if n_dom else float("nan"),
            "lambda": lambd,
            "lr": lr,
            "val_acc": val.value,
            "seconds": time.perf_counter() - e0,
        }
        history.append(row)
        bar.set_postfix(val=f"{val.value:.3f}", dom=f"{row['domain_acc']:.2f}")
        if ckpt is not None and rank == 0:  # only rank 0 writes
            checkpoint.save(ckpt, {
                "model": ema.state_dict(), "optimizer": opt.state_dict(), "history": history,
                **({"train_model": model.state_dict()} if ema is not model else {}),
                "loader_rng": [src_loader.generator.get_state(), tgt_loader.generator.get_state()],
                "rng": checkpoint.rng_state(), "seconds": spent + time.perf_counter() - t0,
                "val_accuracy": val.as_dict(), "mode": mode, "target": target,
            }, config={**_config_dict(cfg), **{k: expect[k] for k in RUN_KEYS}}, step=epoch + 1)
    bar.close()
    ema.eval()
    acc = evaluate(ema, tgt_val.x, tgt_val.y, device)
    return TrainResult(mode, target, ema, history, acc, spent + time.perf_counter() - t0, resumed_from)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for the weights and BatchNorm's running statistics (counters
    are copied)."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        if e.is_floating_point():
            e.lerp_(b, 1.0 - decay)
        else:
            e.copy_(b)


def _sum_over_ranks(n_lab: int, correct_lab: int, n_dom: int, correct_dom: int, sums: dict[str, float], device):
    """The epoch's counts and loss sums added up over all ranks (all_reduce)."""
    import torch.distributed as dist

    keys = sorted(sums)
    t = torch.tensor([n_lab, correct_lab, n_dom, correct_dom, *[sums[k] for k in keys]], dtype=torch.float64,
                     device=device)
    dist.all_reduce(t)
    vals = t.tolist()
    return int(vals[0]), int(vals[1]), int(vals[2]), int(vals[3]), dict(zip(keys, vals[4:], strict=True))


def _config_dict(cfg) -> dict[str, Any]:
    from .config import as_dict

    return as_dict(cfg)


def train_all(cfg, data, device="cpu", save: bool = True, progress: bool = True, log=print,
              modes: Iterable[str] = MODES, seed_in_name: bool = False) -> dict[str, dict[str, TrainResult]]:
    """``{target: {mode: TrainResult}}`` for every target of ``cfg`` and every mode; each run checkpointed
    (``seed_in_name``: under the seed's own name, as ``seed_spread``'s extra runs are)."""
    from .diffusion import world_info

    results: dict[str, dict[str, TrainResult]] = {}
    rank = world_info()[1]
    for target in cfg.targets:
        results[target] = {}
        for mode in modes:
            ckpt = checkpoint_path(target, mode, cfg.profile, cfg.seed if seed_in_name else None) if save else None
            r = train(mode, cfg, data, target, device, ckpt=ckpt, progress=progress, log=log)
            if rank == 0:
                log(f"{TARGET_TITLES.get(target, target)} {MODE_TITLES[mode]:>11}"
                    f"{f' seed {cfg.seed}' if seed_in_name else ''}: {r.accuracy}  ({r.seconds:.1f} s)")
            results[target][mode] = r
    return results


def spread_seeds(cfg) -> list[int]:
    """The extra seeds of ``seed_spread``: cfg.seed + 1 ... cfg.seed + cfg.spread_seeds."""
    return [int(cfg.seed) + k for k in range(1, int(cfg.spread_seeds) + 1)]


def seed_spread(cfg, data, results: dict[str, dict[str, TrainResult]], device="cpu", save: bool = True,
                progress: bool = True, log=print, modes: Iterable[str] = ("source-only", "dann"),
                ) -> dict[str, dict[str, dict[int, Accuracy]]]:
    """Accuracies of ``modes`` for every target over cfg.seed (taken from ``results``) and ``spread_seeds(cfg)``:
    ``{target: {mode: {seed: Accuracy}}}``.

    One run per setting cannot tell a one-point gain from the spread between seeds (on the offline
    data source-only alone varies by several points); the extra seeds vary the initialisation and
    the batch order on the same data.  Each run is checkpointed like the main ones and reused.
    """
    from dataclasses import replace

    modes = tuple(modes)
    out = {t: {m: {int(cfg.seed): results[t][m].accuracy} for m in modes} for t in cfg.targets}
    for seed in spread_seeds(cfg):
        extra = train_all(replace(cfg, seed=seed), data, device, save, progress, log, modes, seed_in_name=True)
        for target, per_mode in extra.items():
            for mode, r in per_mode.items():
                out[target][mode][seed] = r.accuracy
    return out


def spread_rows(spread: dict[str, dict[str, dict[int, Accuracy]]],
                results: dict[str, dict[str, TrainResult]] | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """Per target: mean ± std over seeds of each mode, DANN − source-only per seed (paired by seed), in how
    many seeds DANN is above source-only, and (with ``results``, for the target-only bound) the share of the
    source-only → target-only gap the mean DANN closes."""
    columns = ["pair", "seeds", "source-only mean ± std", "DANN mean ± std", "DANN − source-only per seed",
               "mean difference", "DANN above"] + (["gap closed (means)"] if results else [])
    rows = []
    for target, per_mode in spread.items():
        so, da = per_mode["source-only"], per_mode["dann"]
        seeds = sorted(set(so) & set(da))
        a = np.array([so[s].value for s in seeds])
        b = np.array([da[s].value for s in seeds])
        diff = b - a
        rows.append({
            "pair": TARGET_TITLES.get(target, target), "seeds": ", ".join(str(s) for s in seeds),
            "source-only mean ± std": f"{a.mean():.4f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.4f}",
            "DANN mean ± std": f"{b.mean():.4f} ± {b.std(ddof=1) if len(b) > 1 else 0.0:.4f}",
            "DANN − source-only per seed": ", ".join(f"{100 * d:+.1f}" for d in diff),
            "mean difference": f"{100 * diff.mean():+.1f} points",
            "DANN above": f"{int((diff > 0).sum())} of {len(seeds)}",
        })
        if results and "target-only" in results.get(target, {}):
            hi = results[target]["target-only"].accuracy.value
            rows[-1]["gap closed (means)"] = f"{(b.mean() - a.mean()) / (hi - a.mean()):.1%}" if hi > a.mean() \
                else "n/a (no gap)"
    return rows, columns


# --------------------------------------------------------------------------- tables
def gap_closed(results_for_target: dict[str, TrainResult]) -> float:
    """(DANN - source-only) / (target-only - source-only): the share of the gap DANN closes.

    NaN when there is no gap (target-only not above source-only): nothing to close.
    """
    lo = results_for_target["source-only"].accuracy.value
    mid = results_for_target["dann"].accuracy.value
    hi = results_for_target["target-only"].accuracy.value
    return (mid - lo) / (hi - lo) if hi > lo else float("nan")


def accuracy_rows(results: dict[str, dict[str, TrainResult]]) -> tuple[list[dict[str, str]], list[str]]:
    """Rows source-only / DANN / target-only (+ gap closed), a column per target: 'acc (correct/total)'."""
    columns = ["method"] + [TARGET_TITLES.get(t, t) for t in results]
    rows = []
    for mode in MODES:
        row = {"method": MODE_TITLES[mode]}
        for t, per_mode in results.items():
            if mode in per_mode:
                row[TARGET_TITLES.get(t, t)] = str(per_mode[mode].accuracy)
        rows.append(row)
    gap = {"method": "gap closed by DANN"}
    for t, per_mode in results.items():
        if all(m in per_mode for m in MODES):
            g = gap_closed(per_mode)
            gap[TARGET_TITLES.get(t, t)] = f"{g:.1%}" if math.isfinite(g) else "n/a (no gap)"
    rows.append(gap)
    return rows, columns


def history_arrays(results: dict[str, dict[str, TrainResult]]) -> dict[str, np.ndarray]:
    """Every history column as an array named ``<target>_<mode>_<column>`` (for the figure's npz)."""
    out = {}
    for t, per_mode in results.items():
        for mode, r in per_mode.items():
            for key in ("epoch", "label_loss", "label_acc", "domain_loss", "domain_acc", "lambda", "lr", "val_acc"):
                out[f"{t}_{mode}_{key}".replace("-", "_")] = np.array([h[key] for h in r.history], dtype=float)
    return out


# --------------------------------------------------------------------------- analysis
def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng([seed, n, k]).permutation(n)[:min(k, n)])


def domain_features(model: DANNModel, data, target: str, source: str, n_per_domain: int, seed: int,
                    device="cpu") -> dict[str, np.ndarray]:
    """Features of ``n_per_domain`` validation images per domain: ``features``, ``digit``, ``domain`` (0 src, 1 tgt)."""
    xs, ys, ds = [], [], []
    for d, name in enumerate((source, target)):
        split = data[name]["val"]
        idx = torch.from_numpy(sample_indices(len(split), n_per_domain, seed))
        xs.append(extract_features(model, split.x[idx], device))
        ys.append(split.y[idx].numpy())
        ds.append(np.full(len(idx), d, dtype=np.int64))
    return {"features": np.concatenate(xs), "digit": np.concatenate(ys), "domain": np.concatenate(ds)}


def embed_tsne(features: np.ndarray, seed: int = 0, perplexity: float = 30.0, threads: int | None = 1) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA init) of ``features``; perplexity shrinks for small sets.

    ``threads`` caps the BLAS / OpenMP pools while it runs (None: no cap).  The default 1 is
    deliberate: after torch has trained in the same process, scikit-learn's OpenMP threads
    contend with torch's and a 2-core machine runs t-SNE about 3x slower than single-threaded.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _embed_tsne(features, seed, perplexity)


def _embed_tsne(features: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = min(perplexity, max(2.0, (n - 1) / 3.0))
    x = np.asarray(features, dtype=np.float32)
    if x.shape[1] > 50:  # the usual PCA to 50 dims first: same picture, less time
        from sklearn.decomposition import PCA

        x = PCA(n_components=min(50, n), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def proxy_a_distance(source_features: np.ndarray, target_features: np.ndarray, seed: int = 0,
                     cs: Iterable[float] = (0.001, 0.01, 0.1, 1.0)) -> dict[str, float]:
    """Proxy A-distance 2 (1 - 2 err) (Ben-David et al. 2007; Ganin et al. 2016, sec. 6.1.4).

    ``err`` is the held-out error of a linear SVM telling source from target features:
    the sets are balanced, standardised and split in halves; the SVM is trained on one
    half for each C in ``cs`` and the lowest error on the other half is kept (as the paper
    does).  Near 2: the domains are perfectly separable; near 0: indistinguishable.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # see embed_tsne: torch's and scikit-learn's thread pools contend
        return _proxy_a_distance(source_features, target_features, seed, tuple(cs))


def _proxy_a_distance(source_features, target_features, seed: int, cs: tuple[float, ...]) -> dict[str, float]:
    import warnings

    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(seed)
    n = min(len(source_features), len(target_features))
    a = np.asarray(source_features)[rng.permutation(len(source_features))[:n]]
    b = np.asarray(target_features)[rng.permutation(len(target_features))[:n]]
    x = np.concatenate([a, b]).astype(np.float64)
    y = np.concatenate([np.zeros(n), np.ones(n)])
    order = rng.permutation(2 * n)
    x, y = x[order], y[order]
    half = n
    scaler = StandardScaler().fit(x[:half])
    x_tr, x_te = scaler.transform(x[:half]), scaler.transform(x[half:])
    y_tr, y_te = y[:half], y[half:]
    best = 1.0
    for c in cs:
        clf = LinearSVC(C=c, max_iter=5000, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit(x_tr, y_tr)
        err = float(np.mean(clf.predict(x_te) != y_te))
        best = min(best, err)
    return {"pad": 2.0 * (1.0 - 2.0 * best), "error": best, "n_per_domain": int(n)}


def tsne_for_target(results_for_target: dict[str, TrainResult], data, cfg, device="cpu",
                    modes: Iterable[str] = ("source-only", "dann"), progress: bool = True) -> dict[str, dict]:
    """t-SNE of each model's features on ``cfg.tsne_points`` validation images per domain (the same images for
    every model): ``{mode: {"embedding", "digit", "domain", "seconds"}}``."""
    from tqdm.auto import tqdm

    out = {}
    target = next(iter(results_for_target.values())).target
    for mode in tqdm(list(modes), desc=f"t-SNE {target}", disable=not progress, leave=False):
        t0 = time.perf_counter()
        feats = domain_features(results_for_target[mode].model, data, target, cfg.source, cfg.tsne_points,
                                cfg.seed, device)
        emb = embed_tsne(feats["features"], seed=cfg.seed)
        out[mode] = {"embedding": emb, "digit": feats["digit"], "domain": feats["domain"],
                     "seconds": time.perf_counter() - t0}
    return out


def tsne_panels(tsne: dict[str, dict], colour_by: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{panel title: (points, labels)}`` for ``plots.scatter_2d``; ``colour_by`` is "digit" or "domain"."""
    return {f"{MODE_TITLES[m]} features": (t["embedding"], t[colour_by]) for m, t in tsne.items()}


def tsne_arrays(tsne: dict[str, dict]) -> dict[str, np.ndarray]:
    out = {}
    for mode, t in tsne.items():
        key = mode.replace("-", "_")
        out.update({f"{key}_embedding": t["embedding"], f"{key}_digit": t["digit"], f"{key}_domain": t["domain"]})
    return out


def pad_rows(results: dict[str, dict[str, TrainResult]], data, cfg, device="cpu") -> list[dict[str, Any]]:
    """One row per target: proxy A-distance of source vs target validation features, source-only vs DANN."""
    rows = []
    for target, per_mode in results.items():
        row: dict[str, Any] = {"pair": TARGET_TITLES.get(target, target)}
        n = 0
        for mode in ("source-only", "dann"):
            if mode not in per_mode:
                continue
            feats = domain_features(per_mode[mode].model, data, target, cfg.source, cfg.pad_points, cfg.seed + 1,
                                    device)
            pad = proxy_a_distance(feats["features"][feats["domain"] == 0], feats["features"][feats["domain"] == 1],
                                   seed=cfg.seed)
            row[f"PAD {MODE_TITLES[mode]}"] = round(pad["pad"], 3)
            row[f"SVM error {MODE_TITLES[mode]}"] = round(pad["error"], 3)
            n = pad["n_per_domain"]
        row["points per domain"] = n
        rows.append(row)
    return rows


def curve_panels(results: dict[str, dict[str, TrainResult]]) -> tuple[dict, dict]:
    """Panels for ``plots.curves_grid`` (one per history column) and a line style per series."""
    panels: dict[str, dict] = {}
    spec = [("label loss", "label_loss", MODES), ("label accuracy (training batches)", "label_acc", MODES),
            ("target validation accuracy", "val_acc", MODES), ("domain loss", "domain_loss", ("dann",)),
            ("domain-classifier accuracy", "domain_acc", ("dann",)), ("lambda", "lambda", ("dann",))]
    styles = {}
    colours = {"svhn": "tab:blue", "usps": "tab:orange"}
    dashes = {"source-only": ":", "dann": "-", "target-only": "--"}
    for title, key, modes in spec:
        panels[title] = {}
        for target, per_mode in results.items():
            for mode in modes:
                if mode in per_mode:
                    label = f"{target.upper()} {MODE_TITLES[mode]}"
                    hist = per_mode[mode].history
                    panels[title][label] = ([h["epoch"] for h in hist], [h[key] for h in hist])
                    styles[label] = {"color": colours.get(target), "linestyle": dashes[mode]}
    return panels, styles


def sample_grid(data, n: int = 12, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` training images of every domain in ``data`` (uint8, one row per domain) and the row labels."""
    images, labels = [], []
    for domain, splits in data.items():
        split = splits["train"]
        idx = torch.from_numpy(sample_indices(len(split), n, seed))
        x = ((split.x[idx] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        if len(x) < n:
            x = np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), np.uint8)])
        images.append(x)
        labels.append(f"{domain} ({split.source})")
    return np.concatenate(images), labels


def summary(results: dict[str, dict[str, TrainResult]], pad: list[dict[str, Any]] | None = None,
            spread: dict[str, dict[str, dict[int, Accuracy]]] | None = None) -> str:
    """A few sentences with the numbers: accuracies, gap closed, PAD and the seed spread per target."""
    lines = []
    pad_by = {row["pair"]: row for row in pad or []}
    spread_by = {row["pair"]: row for row in (spread_rows(spread, results)[0] if spread else [])}
    for target, per_mode in results.items():
        title = TARGET_TITLES.get(target, target)
        so, da, to = (per_mode[m].accuracy for m in MODES)
        verdict = "above" if da.value > so.value else "not above"
        g = gap_closed(per_mode)
        closes = f"closes {g:.1%} of the source-only → target-only gap" if math.isfinite(g) else \
            "there is no source-only → target-only gap to close"
        text = (f"{title}: source-only {so}, DANN {da}, target-only {to}; DANN is {verdict} source-only "
                f"({100 * (da.value - so.value):+.1f} points); {closes}.")
        if title in pad_by:
            row = pad_by[title]
            text += f" PAD {row['PAD source-only']:.3f} (source-only) vs {row['PAD DANN']:.3f} (DANN)."
        if title in spread_by and len(spread_by[title]["seeds"].split(",")) > 1:
            row = spread_by[title]
            text += (f" Over seeds {row['seeds']}: source-only {row['source-only mean ± std']}, DANN "
                     f"{row['DANN mean ± std']}, DANN − source-only {row['mean difference']} on average, "
                     f"DANN above in {row['DANN above']}"
                     + (f", closing {row['gap closed (means)']} of the gap." if "gap closed (means)" in row else "."))
        lines.append(text)
    return "\n".join(lines)


# --------------------------------------------------------------------------- checkpoints for prediction
def load_for_prediction(path: str | Path, target: str | None = None, device="cpu") -> tuple[DANNModel, dict]:
    """The DANN model saved by ``train`` at ``path``; refuses one trained for another target or mode."""
    state = checkpoint.load(path)
    config = state.get("config")
    if not isinstance(config, dict) or "model" not in state:
        raise checkpoint.CheckpointError(f"checkpoint {path} is not a DANN checkpoint (no config or model)")
    if state.get("mode", config.get("mode")) != "dann":
        raise checkpoint.CheckpointError(
            f"checkpoint {path} holds a {state.get('mode')!r} model; dann-predict wants a 'dann' one")
    if target is not None and state.get("target") != target:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was trained for target {state.get('target')!r}, not {target!r}")
    if int(state.get("step", 0)) < int(config.get("epochs", 0)):
        print(f"warning: {path} holds a partly trained model (epoch {state.get('step')}/{config.get('epochs')})",
              file=sys.stderr)
    model = DANNModel.from_config(config)
    checkpoint.load_state_dict_strict(model, state["model"], path)
    return model.to(device).eval(), state


def infer_target(test_dir: str | Path) -> str:
    """'svhn' or 'usps' from the test folder's path (the course passes e.g. hw2_data/digits/svhn/data)."""
    parts = [p.lower() for p in Path(test_dir).resolve().parts]
    hits = {t for t in TARGETS if any(t in p for p in parts)}
    if len(hits) != 1:
        raise ValueError(f"cannot tell the target domain from {test_dir} "
                         f"({'both' if hits else 'neither'} of {list(TARGETS)} in the path); pass --target")
    return hits.pop()


def write_predictions(path: str | Path, names: list[str], labels: Iterable[int], overwrite: bool = False) -> Path:
    """``image_name,label`` for every image, written atomically; an existing file needs ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {path} is a folder; expected a .csv file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists; pass --overwrite to replace it")
    lines = ["image_name,label"] + [f"{n},{int(lab)}" for n, lab in zip(names, labels, strict=True)]
    checkpoint.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``dann-predict`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "dann-predict", help="predict digits of a target-domain test folder with a trained DANN model",
        description="Write IMAGE_NAME,LABEL for every *.png in TEST_DIR (sorted by name) to OUT_CSV, "
                    "as the course grader reads it, using the DANN model trained for the target domain.")
    p.add_argument("test_dir", metavar="TEST_DIR", help="folder of 28x28 target-domain PNGs")
    p.add_argument("out_csv", metavar="OUT_CSV", help="output CSV path")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="target domain; default: inferred from TEST_DIR's path (svhn or usps in it)")
    p.add_argument("--checkpoint", default=None,
                   help="DANN checkpoint; default checkpoints/dann_<target>_<profile>.pt")
    p.add_argument("--profile", default="quick", choices=("smoke", "quick", "full"),
                   help="profile whose checkpoint is the default (default: quick)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_CSV if it exists")
    p.set_defaults(func=main_predict)
    return p


def main_predict(args) -> int:
    """``dann-predict``: 0 on success, 2 on bad input (the message names the file)."""
    from .digits import DataError, read_image_folder

    try:
        out = Path(args.out_csv)
        if out.exists() and not args.overwrite:  # fail before reading anything
            raise FileExistsError(f"output {out} exists; pass --overwrite to replace it")
        target = args.target or infer_target(args.test_dir)
        ckpt = Path(args.checkpoint) if args.checkpoint else checkpoint_path(target, "dann", args.profile)
        device = paths.pick_device(args.device)
        model, _ = load_for_prediction(ckpt, target, device)
        names, images = read_image_folder(args.test_dir)
        from .digits import to_tensor

        pred = predict(model, to_tensor(images), device, batch_size=max(1, args.batch_size))
        write_predictions(out, names, pred.tolist(), overwrite=args.overwrite)
    except (checkpoint.CheckpointError, DataError, FileExistsError, IsADirectoryError, ValueError,
            RuntimeError) as exc:
        print(f"dann-predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} predictions for {target} to {out} (model {ckpt})")
    return 0


__all__ = [
    "MODES", "MODE_TITLES", "TARGETS", "TARGET_TITLES", "Accuracy", "Batches", "DANNModel", "GradReverse", "Split",
    "TrainResult", "accuracy_rows", "add_cli", "checkpoint_path", "seed_spread", "spread_rows", "spread_seeds",
    "data_source_of", "describe_data",
    "domain_accuracy", "domain_features", "embed_tsne", "evaluate", "extract_features", "gap_closed", "grad_reverse",
    "history_arrays", "infer_target", "lambda_schedule", "load_data", "load_for_prediction", "lr_at", "main_predict",
    "paired", "predict", "proxy_a_distance", "train", "train_all", "write_predictions", "tsne_for_target",
    "tsne_panels", "tsne_arrays", "pad_rows", "curve_panels", "sample_grid", "summary",
]
