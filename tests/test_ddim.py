import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from hw2lib import config, ddim, faces, samplers, widgets
from hw2lib.__main__ import main
from hw2lib.schedule import NoiseSchedule
from hw2lib.unet import UNet


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(1000, 1e-4, 2e-2)


def tiny_model(size=8, num_classes=0, seed=0):
    """A small random unconditional UNet whose output is not identically zero."""
    torch.manual_seed(seed)
    net = UNet(base_channels=8, channel_mults=(1, 2), attn_resolutions=(), image_size=size, num_classes=num_classes,
               time_dim=16)
    for p in net.out[-1].parameters():
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------- widgets
def test_eta_explorer_redraws_and_caches(schedule):
    torch.set_num_threads(1)
    noises = faces.make_noises(2, 8, seed=1)
    box = widgets.eta_explorer(tiny_model(), noises, schedule, steps=4)
    s = box.slider
    assert (s.min, s.max, s.step, s.continuous_update, s.readout) == (0.0, 1.0, 0.05, False, True)
    assert box.image.format == "png" and box.image in box.children and s in box.children
    first = bytes(box.image.value)
    assert first.startswith(b"\x89PNG") and box.draws == 1
    s.value = 0.5
    assert bytes(box.image.value) != first and box.draws == 2
    s.value = 0.0  # back to a drawn value: from the cache, without running the model
    start = time.perf_counter()
    s.value = 0.5
    s.value = 0.0
    assert time.perf_counter() - start < 0.1 and box.draws == 2
    assert bytes(box.image.value) == first and "cached" in box.status.value
    assert set(box.cache) == {0.0, 0.5}
    # two noises side by side, enlarged: 8 px -> 128 px each, a 2-px gap enlarged too
    assert png_array(first).shape == (128, 2 * 128 + 2 * 16, 3)


def test_eta_explorer_eta0_matches_sampler(schedule):
    noises = faces.make_noises(2, 8, seed=3)
    model = tiny_model()
    box = widgets.eta_explorer(model, noises, schedule, steps=3, value=0.0)
    x = samplers.ddim_sample(model, torch.cat(noises), schedule, steps=3, eta=0.0)
    assert bytes(box.image.value) == widgets.png_row(x)


def test_interpolation_explorer_endpoints(schedule):
    z0, z1 = faces.make_noises(2, 8, seed=2)
    box = widgets.interpolation_explorer(tiny_model(), z0, z1, schedule, steps=3, value=0.0)
    img = png_array(bytes(box.image.value))
    half = (img.shape[1] - 2 * 16) // 2
    # alpha = 0: slerp and lerp are both z0, so the two halves are the same image
    assert np.array_equal(img[:, :half], img[:, -half:])
    box.slider.value = 0.5
    img = png_array(bytes(box.image.value))
    assert not np.array_equal(img[:, :half], img[:, -half:])
    assert box.draws == 2


# --------------------------------------------------------------------------- noises, images, MSE
def test_seeded_noises_course_format_round_trip(tmp_path):
    folder = tmp_path / "ddim_noise"
    got = ddim.seeded_noises(folder, 3, 16, seed=5)
    expected = faces.make_noises(3, 16, seed=5)
    assert sorted(p.name for p in folder.glob("*.pt")) == ["00.pt", "01.pt", "02.pt"]
    for i, (a, b) in enumerate(zip(got, expected)):
        raw = torch.load(folder / f"{i:02d}.pt", weights_only=True)  # a bare tensor, as the course's noises
        assert isinstance(raw, torch.Tensor) and raw.shape == (1, 3, 16, 16) and raw.dtype == torch.float32
        assert torch.equal(a, b) and torch.equal(raw, b)
        assert torch.equal(faces.load_noise(folder / f"{i:02d}.pt", 16), b)
    mtime = (folder / "00.pt").stat().st_mtime_ns
    ddim.seeded_noises(folder, 2, 16, seed=5)  # fewer of the same: reused as they are
    assert (folder / "00.pt").stat().st_mtime_ns == mtime
    other = ddim.seeded_noises(folder, 2, 16, seed=6)  # another seed: replaced, stale files gone
    assert torch.equal(other[0], faces.make_noises(1, 16, seed=6)[0])
    assert sorted(p.name for p in folder.glob("*.pt")) == ["00.pt", "01.pt"]


def test_mse_is_float_without_uint8_wraparound():
    a = np.full((2, 4, 4, 3), 10, np.uint8)
    b = np.full((2, 4, 4, 3), 20, np.uint8)
    assert ddim.mse_per_image(a, b).tolist() == [100.0, 100.0]  # uint8 arithmetic would give 246**2
    assert ddim.mse_per_image(np.zeros((1, 2, 2, 3), np.uint8), np.full((1, 2, 2, 3), 255, np.uint8))[0] == 65025.0
    b[1, 0, 0, 0] = 30  # one pixel off by 20 more: per image, not pooled
    per = ddim.mse_per_image(a, b)
    assert per[0] == 100.0 and per[1] == pytest.approx(100.0 + (400 - 100) / 48)
    with pytest.raises(ValueError, match="shape"):
        ddim.mse_per_image(a, b[:1])


def test_to_uint8_matches_torchvision_save_image(tmp_path):
    from torchvision.utils import save_image

    x = torch.randn(2, 3, 8, 8) * 0.8
    for mapping, kwargs in (("clamp", dict(normalize=True, value_range=(-1, 1))), ("minmax", dict(normalize=True))):
        ours = ddim.to_uint8(x, mapping)
        for i in range(2):
            save_image(x[i], tmp_path / "a.png", **kwargs)
            assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), ours[i]), mapping
    with pytest.raises(ValueError, match="mapping"):
        ddim.to_uint8(x, "other")


def test_convention_choice_picks_lowest_mse(schedule):
    assert ddim.choose_convention({"ermon": 12.0, "plus-one": 3.5}) == "plus-one"
    assert ddim.choose_convention({"ermon": 2.0, "plus-one": 2.0}) == "ermon"
    model, noises = tiny_model(), faces.make_noises(3, 8, seed=4)
    gt = ddim.to_uint8(samplers.ddim_sample(model, torch.cat(noises), schedule, steps=5, eta=0.0,
                                            convention="plus-one"))
    result = ddim.course_mse(model, noises, gt, schedule, steps=5, progress=False)
    assert result.best == "plus-one" and result.convention == "plus-one" and result.mapping == "clamp"
    assert result.means["plus-one"] == 0.0 and result.means["ermon"] > 0
    assert set(result.means) == {"ermon", "plus-one", "ermon (min-max)", "plus-one (min-max)"}
    rows = result.rows()
    assert [r["image"] for r in rows] == ["00.png", "01.png", "02.png", "mean"]
    cfg = config.from_params("ddim", profile="smoke")
    assert ddim.pick_convention(cfg, result) == "plus-one"
    assert ddim.pick_convention(cfg) == "ermon"  # no course GT
    assert ddim.pick_convention(config.from_params("ddim", profile="smoke", convention="plus-one")) == "plus-one"
    with pytest.raises(ValueError, match="convention"):
        ddim.pick_convention(config.from_params("ddim", profile="smoke", convention="ddpm"))


# --------------------------------------------------------------------------- sampling helpers
def test_eta_grid_and_interpolation_rows(schedule):
    model, noises = tiny_model(), faces.make_noises(3, 8, seed=7)
    images, _ = ddim.eta_grid(model, noises, schedule, (0.0, 1.0), steps=4, seed=1, batch=2, progress=False)
    assert images.shape == (2, 3, 3, 8, 8)
    assert torch.allclose(images[0], samplers.ddim_sample(model, torch.cat(noises), schedule, steps=4),
                          rtol=1e-4, atol=1e-4)
    again, _ = ddim.eta_grid(model, noises, schedule, (1.0,), steps=4, seed=1, batch=2, progress=False)
    assert torch.equal(again[0], images[1])  # eta > 0 is reproducible from the seed
    rows, z, _ = ddim.interpolation_rows(model, noises[0], noises[1], schedule, (0.0, 0.5, 1.0), steps=4,
                                         progress=False)
    assert rows["slerp"].shape == rows["linear"].shape == (3, 3, 8, 8) and z.shape == (2, 3, 3, 8, 8)
    assert torch.allclose(rows["slerp"][0], rows["linear"][0], atol=1e-5)
    assert torch.allclose(rows["slerp"][2], rows["linear"][2], atol=1e-5)
    norms = ddim.noise_norms(z)
    assert norms.shape == (2, 3) and norms[1, 1] < 0.85 * norms[0, 1]  # lerp shrinks the noise, slerp does not


def test_clip_x0_is_passed_through(schedule):
    model, x_T = tiny_model(), torch.cat(faces.make_noises(2, 8, seed=8))
    clipped = samplers.ddim_sample(model, x_T, schedule, steps=4, clip_x0=True)
    assert not torch.allclose(clipped, samplers.ddim_sample(model, x_T, schedule, steps=4))
    grid, _ = ddim.eta_grid(model, x_T, schedule, (0.0,), steps=4, progress=False, clip_x0=True)
    assert torch.allclose(grid[0], clipped, atol=1e-5)
    rows, _, _ = ddim.interpolation_rows(model, x_T[:1], x_T[1:], schedule, (0.0,), steps=4, progress=False,
                                         clip_x0=True)
    assert torch.allclose(rows["slerp"][0], clipped[0], atol=1e-5)
    box = widgets.eta_explorer(model, x_T, schedule, steps=4, clip_x0=True)
    assert bytes(box.image.value) == widgets.png_row(clipped)
    assert [ddim.clips(None, "ermon"), ddim.clips(None, "plus-one"), ddim.clips(True, "ermon")] == [False, True, True]
    assert config.from_params("ddim", profile="quick").clip_x0 is True
    assert config.from_params("ddim", profile="full").clip_x0 is None  # the course model: as the convention does


def test_fresh_noise_is_not_the_fixed_noise(schedule):
    """eta > 0 draws its z from another stream than the x_T of the same seed (else z = x_T at step one)."""
    x_T = torch.cat(faces.make_noises(4, 8, seed=0))
    z = torch.randn(x_T.shape, generator=ddim.fresh_noise_generator(0))
    corr = torch.corrcoef(torch.stack([x_T.flatten(), z.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.15
    # a zero-noise model over 2 steps (t = 500 then 0): the output is x_T / sqrt(a_500) + sigma z / sqrt(a_0)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    images, _ = ddim.eta_grid(zero, x_T, schedule, (1.0,), steps=2, seed=0, progress=False)
    a500, a0 = schedule.alpha_bar(500), schedule.alpha_bar(0)
    sigma = samplers.ddim_sigma(a500, a0, 1.0)
    drawn = (images[0].double() - x_T.double() / a500.sqrt()) * a0.sqrt() / sigma
    assert torch.allclose(drawn.float(), z, atol=1e-3)
    # the eta explorer draws the same images as the figure
    model = tiny_model()
    box = widgets.eta_explorer(model, x_T, schedule, steps=3, seed=0, value=0.5)
    grid, _ = ddim.eta_grid(model, x_T, schedule, (0.5,), steps=3, seed=0, progress=False)
    assert bytes(box.image.value) == widgets.png_row(grid[0])


def test_label_bound_fixes_the_label():
    net = tiny_model(num_classes=10)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.equal(ddim.LabelBound(net, 3)(x, t), net(x, t, torch.tensor([3, 3])))
        assert torch.equal(ddim.LabelBound(net, net.null_label)(x, t), net(x, t, None))


# --------------------------------------------------------------------------- models and data
def test_load_data_faces(tmp_path, monkeypatch):
    monkeypatch.setenv("HW2_DATA", str(tmp_path / "data"))
    data = ddim.load_data(config.from_params("ddim", profile="smoke"))
    x = data.tensors()
    assert data.images.dtype == np.uint8 and data.images.shape == (100, 16, 16, 3) and len(data) == 100
    assert x.shape == (100, 3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert data.source == data.manifest["source"] == "offline" and len(data.manifest["checksum"]) == 64


def test_course_model_missing_names_layout(tmp_path):
    cfg = config.from_params("ddim", profile="smoke", model="course", data_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="face/UNet.pt") as err:
        ddim.prepare_model(cfg, "cpu")
    assert "face/noise/00.pt" in str(err.value)
    with pytest.raises(ValueError, match="unknown DDIM model"):
        ddim.prepare_model(config.from_params("ddim", profile="smoke", model="cats"), "cpu")


def test_faces_model_trains_exports_and_reloads(tmp_path, monkeypatch, isolated_dirs):
    from hw2lib import paths, weights

    monkeypatch.setenv("HW2_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(paths, "weights_dir", lambda: tmp_path / "weights")
    cfg = config.from_params("ddim", profile="smoke")
    assert cfg.train
    model, info = ddim.prepare_model(cfg, "cpu", progress=False)
    assert not model.training and info.kind == "faces" and info.steps == cfg.train_steps
    assert info.image_size == 16 and info.schedule.T == 1000
    weights.export_weights(ddim.shipped_weights_name(cfg), model, cfg, "ddim", {"steps": info.steps})
    shipped, sinfo = ddim.prepare_model(config.from_params("ddim", profile="smoke", train=False), "cpu")
    assert sinfo.origin == "shipped weights weights/faces_smoke.pt"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        assert torch.allclose(model(x, t), shipped(x, t), atol=2e-2)
    noises, source = ddim.noises_for(cfg, sinfo)
    assert len(noises) == cfg.n_noises and noises[0].shape == (1, 3, 16, 16) and "seed=0" in source
    assert (paths.runs_dir("smoke") / "ddim_noise" / "00.pt").is_file()


# --------------------------------------------------------------------------- ddim-faces command
def test_ddim_faces_cli_writes_exactly_the_folder(tmp_path, monkeypatch, capsys, schedule):
    noise_dir = tmp_path / "noise"
    noises = faces.make_noises(3, 32, seed=9)
    for i, z in enumerate(noises):
        faces.save_noise(z, noise_dir / f"{i:02d}.pt")
    unet_pt = tmp_path / "UNet.pt"
    unet_pt.write_bytes(b"stand-in")
    model = tiny_model(size=32)
    seen = []

    def fake_loader(path, device):
        seen.append(str(path))
        return model

    monkeypatch.setattr(ddim, "load_unet_file", fake_loader)
    out = tmp_path / "out"
    args = ["ddim-faces", str(noise_dir), str(out), str(unet_pt), "--steps", "4", "--device", "cpu"]
    assert main(args) == 0
    assert seen == [str(unet_pt)]
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "02.png"]
    expected = ddim.to_uint8(samplers.ddim_sample(model, torch.cat(noises), schedule, steps=4, eta=0.0))
    for i in range(3):
        img = Image.open(out / f"{i:02d}.png")
        assert img.mode == "RGB" and img.size == (32, 32)
        assert np.array_equal(np.asarray(img), expected[i])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    # a non-empty folder is refused (nothing changes), unless --overwrite
    before = (out / "00.png").read_bytes()
    assert main(args + ["--eta", "1"]) == 1
    assert "not empty" in capsys.readouterr().err and (out / "00.png").read_bytes() == before
    assert main(args + ["--eta", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00.png", "01.png", "02.png"]
    assert (out / "00.png").read_bytes() != before


def test_ddim_faces_cli_bad_noise(tmp_path, capsys):
    (tmp_path / "noise").mkdir()
    (tmp_path / "noise" / "00.pt").write_bytes(b"")
    assert main(["ddim-faces", str(tmp_path / "noise"), str(tmp_path / "out"), str(tmp_path / "UNet.pt")]) == 1
    err = capsys.readouterr().err
    assert "00.pt" in err and "empty" in err and not (tmp_path / "out").exists()


def test_digits_model_is_bound_to_the_null_label(isolated_dirs):
    cfg = config.from_params("ddim", profile="smoke", model="digits")
    model, info = ddim.prepare_model(cfg, "cpu", progress=False)
    assert isinstance(model, ddim.LabelBound) and model.label == model.model.null_label == 10
    assert info.kind == "digits" and info.image_size == 28 and "null label" in info.description
    x = torch.randn(2, 3, 28, 28)
    assert model(x, torch.tensor([3, 900])).shape == x.shape
    with pytest.raises(ValueError, match="digit"):
        ddim.prepare_model(config.from_params("ddim", profile="smoke", model="digits", digit=10), "cpu")
