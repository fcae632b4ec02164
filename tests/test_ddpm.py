import numpy as np
import pytest
import torch

from hw2lib import config, ddpm, diffusion, samplers
from hw2lib.schedule import NoiseSchedule
from hw2lib.unet import UNet


def tiny_unet(**kw):
    args = dict(base_channels=8, channel_mults=(1, 2), attn_resolutions=(14,), image_size=28, time_dim=32)
    args.update(kw)
    return UNet(**args)


@pytest.mark.parametrize("size,mults,attn", [(28, (1, 2, 2), (7,)), (32, (1, 2, 2, 2), (8, 4)), (16, (1, 2), (8,)),
                                             (64, (1, 2, 2), (16,))])
def test_unet_shapes(size, mults, attn):
    net = UNet(base_channels=8, channel_mults=mults, attn_resolutions=attn, image_size=size, time_dim=32)
    x = torch.randn(3, 3, size, size)
    out = net(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))
    assert out.shape == x.shape
    assert any(isinstance(m, type(net.mid_attn)) for m in net.modules())


def test_unet_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=30, channel_mults=(1, 2, 2))


def test_linear_schedule_float64():
    s = NoiseSchedule.linear(1000, 1e-4, 2e-2)
    assert s.betas.dtype == torch.float64 and s.T == 1000
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(2e-2)
    assert float(s.alpha_bar(-1)) == 1.0
    assert torch.allclose(s.alpha_bars, torch.cumprod(1 - s.betas, 0))


def test_q_sample_mean_and_variance_match_closed_form():
    s = NoiseSchedule.linear()
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for t in (0, 250, 999):
        tt = torch.full((len(x0),), t)
        xt = s.q_sample(x0, tt, torch.randn(x0.shape, generator=torch.Generator().manual_seed(t)))
        ab = float(s.alpha_bars[t])
        assert float(xt.mean()) == pytest.approx(0.7 * ab**0.5, abs=0.02)
        assert float(xt.var()) == pytest.approx(1 - ab, rel=0.05, abs=1e-5)


def test_batched_guidance_equals_two_forwards():
    torch.manual_seed(0)
    net = tiny_unet().eval()
    for p in net.out[-1].parameters():  # the zero-initialised head would make eps identically 0
        torch.nn.init.normal_(p, std=0.1)
    x, t, labels = torch.randn(4, 3, 28, 28), torch.tensor([3, 3, 700, 700]), torch.tensor([1, 2, 3, 4])
    w = 2.5
    with torch.no_grad():
        batched = samplers.guided(net, labels, w)(x, t)
        cond = net(x, t, labels)
        uncond = net(x, t, torch.full_like(labels, net.null_label))
    assert torch.allclose(batched, (1 + w) * cond - w * uncond, atol=1e-5)
    assert not torch.allclose(cond, uncond)
    with torch.no_grad():
        assert torch.allclose(samplers.guided(net, labels, 0.0)(x, t), cond, atol=1e-6)


def test_label_dropout_rate_and_null_label():
    b = diffusion.draw_batch(50, 100000, 1000, (1, 1, 1), 0.1, torch.Generator().manual_seed(0))
    assert float(b["drop"].float().mean()) == pytest.approx(0.1, abs=0.005)
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, t, labels):
            seen["labels"] = labels
            return torch.zeros_like(x)

    x0 = torch.zeros(8, 1, 2, 2)
    drop = torch.tensor([True, False] * 4)
    diffusion.diffusion_loss(Recorder(), NoiseSchedule.linear(), x0, torch.arange(8), torch.zeros(8, dtype=torch.long),
                             torch.randn(8, 1, 2, 2), drop, null_label=10)
    assert seen["labels"].tolist() == [10, 1, 10, 3, 10, 5, 10, 7]


def test_ema_update():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    diffusion.ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)


def _smoke_cfg(**kw):
    return config.from_params("ddpm", profile="smoke", **kw)


def _toy_data(n=64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def test_resume_gives_identical_weights(tmp_path):
    x, y = _toy_data()
    cfg = _smoke_cfg(train_steps=6, checkpoint_every=3)
    torch.manual_seed(0)
    full = diffusion.train(UNet(**_kw(cfg)), x, y, cfg, "ddpm", tmp_path / "a.pt", "cpu", progress=False)
    torch.manual_seed(0)
    part1 = diffusion.train(UNet(**_kw(cfg)), x, y, cfg, "ddpm", tmp_path / "b.pt", "cpu", progress=False,
                            stop_after=3)
    assert part1.step == 3
    torch.manual_seed(123)  # a different fresh init must not matter: everything comes from the checkpoint
    part2 = diffusion.train(UNet(**_kw(cfg)), x, y, cfg, "ddpm", tmp_path / "b.pt", "cpu", progress=False)
    assert part2.resumed_from == 3 and part2.step == 6
    for (k, v1), v2 in zip(full.model.state_dict().items(), part2.model.state_dict().values()):
        assert torch.equal(v1, v2), k
    for v1, v2 in zip(full.ema.state_dict().values(), part2.ema.state_dict().values()):
        assert torch.equal(v1, v2)


def test_resume_refuses_other_config(tmp_path):
    from hw2lib.checkpoint import CheckpointError

    x, y = _toy_data()
    cfg = _smoke_cfg(train_steps=2, checkpoint_every=2)
    diffusion.train(UNet(**_kw(cfg)), x, y, cfg, "ddpm", tmp_path / "c.pt", "cpu", progress=False)
    other = _smoke_cfg(train_steps=4, lr=1e-4)
    with pytest.raises(CheckpointError, match="lr"):
        diffusion.train(UNet(**_kw(other)), x, y, other, "ddpm", tmp_path / "c.pt", "cpu", progress=False)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    x, y = _toy_data()
    cfg = _smoke_cfg(train_steps=4, checkpoint_every=2)
    path = tmp_path / "d.pt"
    diffusion.train(UNet(**_kw(cfg)), x, y, cfg, "ddpm", path, "cpu", progress=False, stop_after=2)
    before = path.read_bytes()
    bad = x.clone()
    bad[:] = float("nan")
    with pytest.raises(diffusion.TrainingDiverged, match="step 3"):
        diffusion.train(UNet(**_kw(cfg)), bad, y, cfg, "ddpm", path, "cpu", progress=False)
    assert path.read_bytes() == before


def test_loss_falls_on_smoke_run():
    g = torch.Generator().manual_seed(0)
    # simple structured data: per-class constant colour images
    y = torch.randint(0, 10, (256,), generator=g)
    x = (y.float() / 9 * 2 - 1)[:, None, None, None].expand(-1, 3, 28, 28).contiguous()
    cfg = _smoke_cfg(train_steps=60, batch_size=32, lr=3e-3, warmup_steps=5, checkpoint_every=1000)
    torch.manual_seed(0)
    r = diffusion.train(UNet(**_kw(cfg)), x, y, cfg, "ddpm", None, "cpu", progress=False, log_every=10)
    losses = [h["loss"] for h in r.history]
    assert np.mean(losses[-2:]) < 0.6 * losses[0]


def _kw(cfg):
    return dict(base_channels=cfg.base_channels, channel_mults=cfg.channel_mults, attn_resolutions=cfg.attn_resolutions,
                image_size=cfg.image_size, time_dim=cfg.time_dim, num_classes=cfg.num_classes)


def test_course_file_naming(tmp_path):
    labels = np.repeat(np.arange(10), 3)
    images = np.zeros((30, 28, 28, 3), np.uint8)
    out = ddpm.write_course_folder(images, labels, tmp_path / "out")
    names = sorted(p.name for p in out.iterdir())
    assert names[:3] == ["0_001.png", "0_002.png", "0_003.png"] and names[-1] == "9_003.png" and len(names) == 30
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    with pytest.raises(FileExistsError, match="not empty"):
        ddpm.write_course_folder(images, labels, tmp_path / "out")
    from hw2lib import evaluate

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    acc, correct, total = evaluate.folder_accuracy(out, Zero())
    assert (correct, total) == (3, 30)


def test_interrupted_folder_write_leaves_nothing(tmp_path, interrupt_image_save):
    interrupt_image_save(5)
    with pytest.raises(KeyboardInterrupt):
        ddpm.write_course_folder(np.zeros((10, 28, 28, 3), np.uint8), np.arange(10), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bf16_autocast_sampling_stays_float32_and_close():
    torch.manual_seed(0)
    net = tiny_unet().eval()
    for p in net.out[-1].parameters():
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.arange(4)
    cfg32 = _smoke_cfg(sample_steps=3)
    cfg16 = _smoke_cfg(sample_steps=3, autocast="bf16")
    a, _ = ddpm.generate(net, labels, cfg32, 2.0, 0, "cpu", progress=False)
    b, _ = ddpm.generate(net, labels, cfg16, 2.0, 0, "cpu", progress=False)
    assert a.dtype == b.dtype == torch.float32
    assert float((a - b).abs().mean()) < 0.05
    with pytest.raises(ValueError, match="autocast"):
        ddpm.generate(net, labels, _smoke_cfg(autocast="fp8"), 2.0, 0, "cpu", progress=False)


def _noisy_head_unet():
    torch.manual_seed(0)
    net = tiny_unet().eval()
    for p in net.out[-1].parameters():  # the zero-initialised head would make every image the same
        torch.nn.init.normal_(p, std=0.05)
    return net


def test_channels_last_sampling_gives_the_same_images():
    import copy

    net = _noisy_head_unet()
    labels = torch.arange(5)
    a, _ = ddpm.generate(net, labels, _smoke_cfg(sample_steps=3), 2.0, 0, "cpu", progress=False)
    cl_net = copy.deepcopy(net)
    b, _ = ddpm.generate(cl_net, labels, _smoke_cfg(sample_steps=3, channels_last=True), 2.0, 0, "cpu",
                         progress=False)
    assert cl_net.inc.weight.is_contiguous(memory_format=torch.channels_last)  # converted in place
    assert not net.inc.weight.is_contiguous(memory_format=torch.channels_last)
    assert b.is_contiguous() and b.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-4)


def _forward_batches(net):
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    return seen


def test_fixed_shapes_pad_the_last_batch_and_keep_the_images():
    net = _noisy_head_unet()
    labels = torch.arange(6)
    cfg = _smoke_cfg(sample_steps=3, sample_batch=4)  # DDIM, eta 0: the images depend on x_T only
    seen = _forward_batches(net)
    a, _ = ddpm.generate(net, labels, cfg, 2.0, 0, "cpu", progress=False, fixed_shapes=False)
    assert sorted(set(seen)) == [4, 8]  # guidance: one forward of 2N; the last batch has N = 2
    seen.clear()
    shapes = []
    b, _ = ddpm.generate(net, labels, cfg, 2.0, 0, "cpu", progress=False, fixed_shapes=True,
                         callback=lambda batch, i, t, x: shapes.append((batch, len(x))))
    assert set(seen) == {8}  # every forward of the run: 2 x 4
    assert b.shape == a.shape == (6, 3, 28, 28)
    assert set(shapes) == {(0, 4), (1, 2)}  # the callback never sees the padding
    assert torch.allclose(a, b, atol=1e-5)
    # DDPM: the first (unpadded) batch is exactly the same; only the padded one draws other noise
    ddpm_cfg = _smoke_cfg(sample_batch=4, sampler="ddpm", timesteps=20)
    c, _ = ddpm.generate(net, labels, ddpm_cfg, 2.0, 0, "cpu", progress=False, fixed_shapes=False)
    d, _ = ddpm.generate(net, labels, ddpm_cfg, 2.0, 0, "cpu", progress=False, fixed_shapes=True)
    assert torch.equal(c[:4], d[:4]) and c.shape == d.shape


def test_compile_option_compiles_once_with_static_shapes(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):  # a real compile takes minutes on this CPU
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    net = _noisy_head_unet()
    labels = torch.arange(6)
    ref, _ = ddpm.generate(net, labels, _smoke_cfg(sample_steps=2, sample_batch=4), 2.0, 0, "cpu", progress=False)
    seen = _forward_batches(net)
    cfg = _smoke_cfg(sample_steps=2, sample_batch=4, compile=True)
    for _ in range(2):
        out, _ = ddpm.generate(net, labels, cfg, 2.0, 0, "cpu", progress=False)
        assert torch.allclose(out, ref, atol=1e-5)
    assert calls == [{"dynamic": False}]  # compiled once, in place
    assert set(seen) == {8}  # compiling implies fixed shapes


def test_fast_path_options_reject_bad_values():
    import dataclasses

    with pytest.raises(TypeError, match="channels_last"):
        config.from_params("ddpm", profile="smoke", channels_last="yes")
    with pytest.raises(TypeError, match="compile"):
        config.from_params("ddpm", profile="smoke", compile=1)
    net = tiny_unet().eval()
    for bad in (dict(channels_last="yes"), dict(compile=1)):
        with pytest.raises(TypeError, match="must be a bool"):
            ddpm.generate(net, torch.arange(2), dataclasses.replace(_smoke_cfg(), **bad), 1.0, 0, "cpu",
                          progress=False)


def test_schedule_on_a_device_and_int_alpha_bar():
    s = NoiseSchedule.linear()
    moved = s.to("cpu")
    assert moved is not s and torch.equal(moved.posterior_variance, s.posterior_variance)
    assert float(s.alpha_bar(-1)) == 1.0
    for t in (-1, 0, 500, 999):
        assert torch.equal(s.alpha_bar(t), s.alpha_bar(torch.tensor(t)))
    assert torch.equal(s.alpha_bar(torch.tensor([0, 999])), s.alpha_bars[[0, 999]])


def test_stage_data_keeps_cpu_tensors_in_place():
    x, y = _toy_data(8)
    sx, sy = diffusion.stage_data(x, y, "cpu")
    assert sx is x and sy is y
    assert diffusion.to_device(x, torch.device("cpu")) is x
