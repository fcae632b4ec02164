"""DANN: gradient reversal, the lambda schedule, training steps, domain accuracy, PAD, dann-predict's CSV."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hw2lib import checkpoint, config, dann


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one thread is as fast and immune to oversubscription on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- toy data
def toy_images(n: int, domain: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = a bright 6x6 square at one of 10 places; the target domain is darker, noisier and tinted."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.full((n, 3, 28, 28), -0.8) + 0.1 * torch.randn(n, 3, 28, 28, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = 2 + 12 * (c // 5), 1 + 5 * (c % 5)
        x[i, :, r:r + 6, col:col + 6] += 1.5
    if domain:
        x = 0.6 * x + 0.3 * torch.randn(n, 3, 28, 28, generator=g)
        x[:, 0] += 0.4
    return x.clamp(-1, 1), y


def toy_data(n_src=192, n_tgt=96, n_val=60, target="usps"):
    def split(domain_name, dom, split_name, n, seed):
        x, y = toy_images(n, dom, seed)
        return dann.Split(domain_name, split_name, x, y, "toy")

    return {
        "mnistm": {"train": split("mnistm", 0, "train", n_src, 1), "val": split("mnistm", 0, "val", n_val, 2)},
        target: {"train": split(target, 1, "train", n_tgt, 3), "val": split(target, 1, "val", n_val, 4)},
    }


def toy_cfg(**kw):
    base = dict(targets=("usps",), epochs=3, batch_size=32, lr=2e-3, tsne_points=30)
    base.update(kw)
    return config.from_params("dann", profile="smoke", **base)


# --------------------------------------------------------------------------- gradient reversal
def test_grad_reverse_forward_is_identity():
    x = torch.randn(4, 7)
    y = dann.grad_reverse(x, 0.37)
    assert torch.equal(y, x)
    assert y.shape == x.shape


@pytest.mark.parametrize("lambd", [0.0, 0.25, 1.0, 3.5])
def test_grad_reverse_backward_is_minus_lambda_times_the_gradient(lambd):
    torch.manual_seed(0)
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, 2)

    def loss_of(h):
        return ((h @ w).tanh() ** 2).sum()

    (plain,) = torch.autograd.grad(loss_of(x), x)
    (reversed_,) = torch.autograd.grad(loss_of(dann.grad_reverse(x, lambd)), x)
    assert torch.equal(reversed_, plain * (-lambd))


def test_grad_reverse_flips_only_the_feature_side_of_a_model():
    """Behind the reversal layer the domain head learns as usual; the features get the flipped gradient."""
    torch.manual_seed(0)
    model = dann.DANNModel(dropout=0.0)
    x = torch.randn(6, 3, 28, 28)
    is_target = torch.tensor([0.0, 0, 0, 1, 1, 1])

    def grads(lambd):
        model.zero_grad()
        _, dom, _ = model(x, lambd)
        torch.nn.functional.binary_cross_entropy_with_logits(dom, is_target).backward()
        return ([p.grad.clone() for p in model.features.parameters()],
                [p.grad.clone() for p in model.domain_classifier.parameters()])

    f_rev, d_rev = grads(0.5)
    f_one, d_one = grads(-1.0)  # -(-1) = +1: the plain gradient
    for a, b in zip(d_rev, d_one):
        assert torch.equal(a, b)
    for a, b in zip(f_rev, f_one):
        torch.testing.assert_close(a, -0.5 * b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
def test_model_of_each_profile_has_the_right_shapes(profile):
    cfg = config.from_params("dann", profile=profile)
    model = dann.DANNModel.from_config(cfg).eval()
    x = torch.randn(4, 3, 28, 28)
    class_logits, domain_logits, features = model(x, 1.0, n_labelled=3)
    assert class_logits.shape == (3, 10) and domain_logits.shape == (4,)
    assert features.shape == (4, model.feature_dim)
    assert model.classify(x).shape == (4, 10)


def test_lambda_schedule_ends():
    assert dann.lambda_schedule(0.0) == 0.0
    assert dann.lambda_schedule(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann.lambda_schedule(1.0) > 0.9999
    assert dann.lambda_schedule(0.999999) == pytest.approx(1.0, abs=1e-4)
    ps = np.linspace(0, 1, 50)
    values = [dann.lambda_schedule(p) for p in ps]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert dann.lambda_schedule(0.5, gamma=10) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert dann.lambda_schedule(2.0) == dann.lambda_schedule(1.0)  # progress is clipped to [0, 1]


def test_domain_accuracy_counts_logits_above_zero_as_target():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    is_target = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    assert dann.domain_accuracy(logits, is_target) == (3, 5)
    assert dann.domain_accuracy(torch.tensor([[1.0], [-1.0]]), torch.tensor([1, 0])) == (2, 2)


def test_paired_cycles_the_shorter_loader():
    short, long_ = [1, 2, 3], list("abcdefg")
    pairs = list(dann.paired(short, long_))
    assert len(pairs) == 7
    assert [a for a, _ in pairs] == [1, 2, 3, 1, 2, 3, 1]
    assert [b for _, b in pairs] == long_
    assert len(list(dann.paired(long_, short))) == 7


def test_batches_reshuffle_and_cover_everything():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    b = dann.Batches(x, y, 4, seed=0)
    assert len(b) == 2  # full batches only
    first, second = [yy.tolist() for _, yy in b], [yy.tolist() for _, yy in b]
    assert first != second
    small = dann.Batches(x[:3], y[:3], 4)
    assert len(small) == 1 and sorted(next(iter(small))[1].tolist()) == [0, 1, 2]


# --------------------------------------------------------------------------- training
def test_a_few_dann_steps_reduce_the_label_loss():
    torch.manual_seed(0)
    data = toy_data()
    model = dann.DANNModel(dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xs, ys = data["mnistm"]["train"].x[:40], data["mnistm"]["train"].y[:40]
    xt = data["usps"]["train"].x[:40]
    is_target = torch.cat([torch.zeros(40), torch.ones(40)])
    losses = []
    for step in range(20):
        class_logits, domain_logits, _ = model(torch.cat([xs, xt]), dann.lambda_schedule(step / 20), n_labelled=40)
        label_loss = torch.nn.functional.cross_entropy(class_logits, ys)
        loss = label_loss + torch.nn.functional.binary_cross_entropy_with_logits(domain_logits, is_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(label_loss.item())
    assert class_logits.shape == (40, 10) and domain_logits.shape == (80,)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("mode", dann.MODES)
def test_train_modes_history_and_accuracy(mode):
    cfg = toy_cfg()
    result = dann.train(mode, cfg, toy_data(), "usps", progress=False, log=lambda *a: None)
    hist = result.history
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["label_loss"] < hist[0]["label_loss"]
    assert set(hist[0]) >= {"label_loss", "domain_loss", "label_acc", "domain_acc", "lambda", "val_acc"}
    acc = result.accuracy
    assert acc.total == 60 and 0 <= acc.correct <= 60
    assert str(acc) == f"{acc.correct / 60:.4f} ({acc.correct}/60)"
    if mode == "dann":
        lambdas = [h["lambda"] for h in hist]
        assert 0 < lambdas[0] < lambdas[1] < lambdas[2] <= 1
        assert all(0 <= h["domain_acc"] <= 1 and h["domain_loss"] > 0 for h in hist)
    else:
        assert all(h["lambda"] == 0.0 and math.isnan(h["domain_acc"]) for h in hist)


def test_training_resumes_from_its_checkpoint(tmp_path):
    cfg = toy_cfg(epochs=2)
    ckpt = tmp_path / "dann_usps_smoke.pt"
    data = toy_data(n_src=96, n_tgt=64, n_val=30)
    first = dann.train("dann", cfg, data, "usps", ckpt=ckpt, progress=False, log=lambda *a: None)
    again = dann.train("dann", cfg, data, "usps", ckpt=ckpt, progress=False, log=lambda *a: None)
    assert again.resumed_from_epoch == 2
    assert again.history == first.history
    assert str(again.accuracy) == str(first.accuracy)
    other = dann.train("dann", toy_cfg(epochs=1, lr=1e-3), data, "usps", ckpt=ckpt, progress=False,
                       log=lambda *a: None)
    assert other.resumed_from_epoch == 0  # another config starts fresh


def test_ema_weights_are_evaluated_saved_and_resumed(tmp_path):
    data = toy_data(n_src=96, n_tgt=64, n_val=30)
    ckpt = tmp_path / "dann_usps_smoke.pt"
    cfg = toy_cfg(epochs=2, ema_decay=0.9, batch_norm=True)
    r = dann.train("dann", cfg, data, "usps", ckpt=ckpt, progress=False, log=lambda *a: None)
    state = checkpoint.load(ckpt)
    raw, averaged = state["train_model"], state["model"]
    assert set(raw) == set(averaged)
    # the returned model is the average: its weights and BatchNorm statistics, not the last step's
    assert all(torch.equal(v, averaged[k]) for k, v in r.model.state_dict().items())
    assert not all(torch.equal(raw[k], averaged[k]) for k in raw if raw[k].is_floating_point())
    assert str(r.accuracy) == str(dann.evaluate(r.model, data["usps"]["val"].x, data["usps"]["val"].y))
    # dann-predict's loader reads the averaged weights; a rerun reuses the checkpoint unchanged
    model, _ = dann.load_for_prediction(ckpt, "usps")
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    again = dann.train("dann", cfg, data, "usps", ckpt=ckpt, progress=False, log=lambda *a: None)
    assert again.resumed_from_epoch == 2 and str(again.accuracy) == str(r.accuracy)
    # resuming after epoch 1 continues the average as it was: the same as one uninterrupted run
    ckpt2 = tmp_path / "interrupted.pt"
    dann.train("dann", cfg, data, "usps", ckpt=ckpt2, progress=False, log=lambda *a: None, stop_after=1)
    resumed = dann.train("dann", cfg, data, "usps", ckpt=ckpt2, progress=False, log=lambda *a: None)
    assert resumed.resumed_from_epoch == 1
    for k, v in r.model.state_dict().items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-5), k
    with pytest.raises(ValueError, match="ema_decay"):
        dann.train("dann", toy_cfg(epochs=1, ema_decay=1.0), data, "usps", progress=False, log=lambda *a: None)


def test_accuracy_rows_and_gap_closed():
    def r(mode, correct):
        return dann.TrainResult(mode, "usps", None, [], dann.Accuracy(correct, 200))

    results = {"usps": {"source-only": r("source-only", 100), "dann": r("dann", 130),
                        "target-only": r("target-only", 160)}}
    assert dann.gap_closed(results["usps"]) == pytest.approx(0.5)
    rows, columns = dann.accuracy_rows(results)
    assert columns == ["method", "MNIST-M → USPS"]
    assert [row["method"] for row in rows] == ["source-only", "DANN", "target-only", "gap closed by DANN"]
    assert rows[1]["MNIST-M → USPS"] == "0.6500 (130/200)"
    assert rows[3]["MNIST-M → USPS"] == "50.0%"


def test_spread_rows_pair_differences_by_seed():
    acc = dann.Accuracy
    spread = {"usps": {"source-only": {0: acc(100, 200), 1: acc(120, 200), 2: acc(110, 200)},
                       "dann": {0: acc(104, 200), 1: acc(118, 200), 2: acc(116, 200)}}}
    rows, columns = dann.spread_rows(spread)
    assert columns[0] == "pair" and len(rows) == 1
    row = rows[0]
    assert row["seeds"] == "0, 1, 2"
    assert row["DANN − source-only per seed"] == "+2.0, -1.0, +3.0"
    assert row["mean difference"] == "+1.3 points"
    assert row["DANN above"] == "2 of 3"
    assert row["source-only mean ± std"] == "0.5500 ± 0.0500"  # 0.50, 0.60, 0.55: sample std 0.05
    assert "gap closed (means)" not in columns
    bound = {"usps": {"target-only": dann.TrainResult("target-only", "usps", None, [], acc(190, 200))}}
    rows, columns = dann.spread_rows(spread, bound)
    assert columns[-1] == "gap closed (means)"
    assert rows[0]["gap closed (means)"] == "3.3%"  # (0.5633 - 0.55) / (0.95 - 0.55)


def test_seed_spread_trains_the_extra_seeds_and_reuses_their_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("HW2_CHECKPOINTS", str(tmp_path / "ckpt"))
    cfg = toy_cfg(epochs=1, spread_seeds=2, seed=5)
    data = toy_data()
    results = {"usps": {m: dann.train(m, cfg, data, "usps", progress=False, log=lambda *a: None)
                        for m in ("source-only", "dann")}}
    assert dann.spread_seeds(cfg) == [6, 7]
    spread = dann.seed_spread(cfg, data, results, save=True, progress=False, log=lambda *a: None)
    assert set(spread["usps"]) == {"source-only", "dann"}
    assert sorted(spread["usps"]["dann"]) == [5, 6, 7]
    assert spread["usps"]["dann"][5] is results["usps"]["dann"].accuracy  # the main run is not trained again
    assert all(a.total == 60 for by_seed in spread["usps"].values() for a in by_seed.values())
    for seed in (6, 7):
        for mode in ("source-only", "dann"):
            path = dann.checkpoint_path("usps", mode, "smoke", seed)
            assert path.is_file() and path.name == f"dann_usps_{mode}_smoke_seed{seed}.pt"
    # a second call reuses the checkpoints: same accuracies, no training
    calls = []
    again = dann.seed_spread(cfg, data, results, progress=False, log=calls.append)
    assert {m: {s: str(a) for s, a in v.items()} for m, v in again["usps"].items()} == \
        {m: {s: str(a) for s, a in v.items()} for m, v in spread["usps"].items()}
    assert any("resumed" in line for line in calls)
    results["usps"]["target-only"] = dann.train("target-only", cfg, data, "usps", progress=False,
                                                log=lambda *a: None)
    assert "Over seeds 5, 6, 7" in dann.summary(results, None, spread)


def test_proxy_a_distance_extremes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8))
    far = rng.normal(size=(300, 8)) + 6.0
    same = rng.normal(size=(300, 8))
    assert dann.proxy_a_distance(a, far)["pad"] > 1.9
    assert abs(dann.proxy_a_distance(a, same)["pad"]) < 0.5


def test_embed_tsne_shape():
    feats = np.random.default_rng(0).normal(size=(40, 60)).astype(np.float32)
    emb = dann.embed_tsne(feats, seed=0)
    assert emb.shape == (40, 2) and np.isfinite(emb).all()


# --------------------------------------------------------------------------- dann-predict
def make_checkpoint(path, target="svhn", mode="dann"):
    cfg = toy_cfg(targets=(target,))
    torch.manual_seed(0)
    model = dann.DANNModel.from_config(cfg)
    checkpoint.save(path, {"model": model.state_dict(), "mode": mode, "target": target},
                    config={**config.as_dict(cfg), "mode": mode, "target": target}, step=cfg.epochs)
    return model


def make_test_folder(folder, n=7):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:05d}.png" for i in range(n)]
    for i, name in enumerate(names):
        mode = "L" if i % 2 else "RGB"
        shape = (28, 28) if mode == "L" else (28, 28, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return names


def run_cli(*argv):
    parser = argparse.ArgumentParser(prog="hw2lib")
    sub = parser.add_subparsers(dest="command", required=True)
    dann.add_cli(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_dann_predict_writes_the_course_csv(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    make_checkpoint(ckpt, "svhn")
    folder = tmp_path / "hw2_data" / "digits" / "svhn" / "data"
    names = make_test_folder(folder)
    out = tmp_path / "pred.csv"
    assert run_cli("dann-predict", str(folder), str(out), "--checkpoint", str(ckpt), "--device", "cpu") == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "image_name,label"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == sorted(names)
    assert all(len(r) == 2 and r[1].isdigit() and 0 <= int(r[1]) <= 9 for r in rows)

    # an existing output is kept unless --overwrite
    out.write_text("keep me\n")
    assert run_cli("dann-predict", str(folder), str(out), "--checkpoint", str(ckpt)) == 2
    assert out.read_text() == "keep me\n"
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli("dann-predict", str(folder), str(out), "--checkpoint", str(ckpt), "--overwrite") == 0
    assert out.read_text().splitlines()[0] == "image_name,label"


def test_dann_predict_refuses_a_checkpoint_of_another_target_or_mode(tmp_path, capsys):
    folder = tmp_path / "usps" / "data"
    make_test_folder(folder, n=3)
    ckpt = tmp_path / "svhn.pt"
    make_checkpoint(ckpt, "svhn")
    assert run_cli("dann-predict", str(folder), str(tmp_path / "a.csv"), "--checkpoint", str(ckpt)) == 2
    assert "target 'svhn', not 'usps'" in capsys.readouterr().err
    bound = tmp_path / "bound.pt"
    make_checkpoint(bound, "usps", mode="source-only")
    assert run_cli("dann-predict", str(folder), str(tmp_path / "b.csv"), "--checkpoint", str(bound)) == 2
    assert "'source-only' model" in capsys.readouterr().err
    assert not (tmp_path / "a.csv").exists() and not (tmp_path / "b.csv").exists()


def test_dann_predict_names_a_corrupt_image(tmp_path, capsys):
    folder = tmp_path / "svhn"
    make_test_folder(folder, n=2)
    (folder / "00001.png").write_bytes(b"not a png")
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, "svhn")
    assert run_cli("dann-predict", str(folder), str(tmp_path / "p.csv"), "--checkpoint", str(ckpt)) == 2
    assert "00001.png" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_infer_target_from_the_path(tmp_path):
    assert dann.infer_target(tmp_path / "hw2_data" / "digits" / "usps" / "data") == "usps"
    assert dann.infer_target(tmp_path / "SVHN_test") == "svhn"
    with pytest.raises(ValueError, match="--target"):
        dann.infer_target(tmp_path / "digits" / "data")
