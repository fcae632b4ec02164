"""Digit and face data: the course layout, its bad inputs, and the offline default.

Fake course layouts are built under ``tmp_path``; generated data (course caches, offline
rebuilds) goes to a ``HW2_DATA`` under ``tmp_path`` too, except the shape / range tests of
the offline default, which read (and on a fresh machine build) the repository's cache.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from hw2lib import digits, faces
from hw2lib.digits import DataError


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """HW2_DATA (generated data) under tmp_path; no course data from the environment."""
    path = tmp_path / "generated"
    monkeypatch.setenv("HW2_DATA", str(path))
    monkeypatch.delenv("HW2_DATA_ROOT", raising=False)
    return path


def write_domain(root, domain, n=6, mode="RGB", split="train", rows=None, header="image_name,label"):
    """A fake ``digits/<domain>`` with ``n`` 28x28 PNGs and ``<split>.csv``; returns the folder."""
    folder = root / "digits" / domain
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [header]
    for i in range(n):
        name = f"{i:05d}.png"
        shape = (28, 28, 3) if mode == "RGB" else (28, 28)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / "data" / name)
        lines.append(f"{name},{i % 10}")
    if rows is not None:
        lines = [header, *rows]
    (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------------- course layout: good input
def test_course_layout_loads_rgb_and_grey_as_three_channels(tmp_path, data_dir):
    write_domain(tmp_path, "mnistm", n=6)
    write_domain(tmp_path, "usps", n=5, mode="L")
    write_domain(tmp_path, "usps", n=5, mode="L", split="val")
    for domain, n in (("mnistm", 6), ("usps", 5)):
        ds = digits.load_domain(domain, "train", source="course", data_root=tmp_path)
        assert ds.source == "course" and len(ds) == n and ds.manifest["count"] == n
        assert ds.images.shape == (n, 28, 28, 3) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [i % 10 for i in range(n)]
        x, y = ds.tensors()
        assert x.shape == (n, 3, 28, 28) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    usps = digits.load_domain("usps", "val", data_root=tmp_path)  # auto: the course layout is there
    assert usps.source == "course"
    grey = np.asarray(Image.open(tmp_path / "digits/usps/data/00000.png"))
    assert np.array_equal(usps.images[0], np.repeat(grey[..., None], 3, axis=-1))


# --------------------------------------------------------------------------- course layout: bad input
def test_missing_folder_lists_expected_layout(tmp_path, data_dir):
    write_domain(tmp_path, "mnistm")
    with pytest.raises(DataError) as err:
        digits.load_domain("svhn", "train", source="course", data_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "digits" / "svhn") in msg
    assert "digits/svhn/data/*.png" in msg and "train.csv" in msg and "image_name,label" in msg
    with pytest.raises(DataError, match="expected layout"):
        digits.load_domain("mnistm", "train", data_root=tmp_path / "nowhere")


def test_csv_row_with_missing_image_names_file_and_row(tmp_path, data_dir):
    folder = write_domain(tmp_path, "mnistm", n=4)
    (folder / "data" / "00002.png").unlink()
    with pytest.raises(DataError) as err:
        digits.load_domain("mnistm", "train", source="course", data_root=tmp_path)
    msg = str(err.value)
    assert "train.csv row 4" in msg and "00002.png" in msg and "does not exist" in msg


def test_corrupt_png_names_file(tmp_path, data_dir):
    folder = write_domain(tmp_path, "mnistm", n=3)
    (folder / "data" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(DataError, match=r"00001\.png is corrupt or not an image"):
        digits.load_domain("mnistm", "train", source="course", data_root=tmp_path)


def test_zero_byte_png_names_file(tmp_path, data_dir):
    folder = write_domain(tmp_path, "svhn", n=3)
    (folder / "data" / "00000.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"00000\.png is empty \(0 bytes\); expected a PNG"):
        digits.load_domain("svhn", "train", source="course", data_root=tmp_path)


def test_wrong_image_size_names_file_and_size(tmp_path, data_dir):
    folder = write_domain(tmp_path, "svhn", n=3)
    Image.new("RGB", (32, 32)).save(folder / "data" / "00001.png")
    with pytest.raises(DataError, match=r"00001\.png is 32x32; expected 28x28"):
        digits.load_domain("svhn", "train", source="course", data_root=tmp_path)


def test_wrong_column_name(tmp_path, data_dir):
    write_domain(tmp_path, "mnistm", n=3, header="filename,label")
    with pytest.raises(DataError) as err:
        digits.load_domain("mnistm", "train", source="course", data_root=tmp_path)
    msg = str(err.value)
    assert "train.csv" in msg and "filename" in msg and "expected columns 'image_name,label'" in msg


def test_non_integer_label_names_row(tmp_path, data_dir):
    write_domain(tmp_path, "mnistm", n=3, rows=["00000.png,3", "00001.png,seven"])
    with pytest.raises(DataError, match=r"train\.csv row 3: label 'seven' is not an integer 0\.\.9"):
        digits.load_domain("mnistm", "train", source="course", data_root=tmp_path)


def test_label_outside_0_to_9_names_row(tmp_path, data_dir):
    write_domain(tmp_path, "usps", n=3, mode="L", rows=["00000.png,3", "00001.png,4", "00002.png,10"])
    with pytest.raises(DataError, match=r"train\.csv row 4: label 10 is outside 0\.\.9"):
        digits.load_domain("usps", "train", source="course", data_root=tmp_path)


def test_empty_split(tmp_path, data_dir):
    write_domain(tmp_path, "mnistm", n=2, rows=[])
    with pytest.raises(DataError, match=r"train\.csv has a header but no rows"):
        digits.load_domain("mnistm", "train", source="course", data_root=tmp_path)
    (tmp_path / "digits/mnistm/train.csv").write_text("")
    with pytest.raises(DataError, match=r"train\.csv is empty"):
        digits.load_domain("mnistm", "train", source="course", data_root=tmp_path)


# --------------------------------------------------------------------------- course faces
def test_noise_and_gt_round_trip(tmp_path):
    noise_dir, gt_dir = tmp_path / "face" / "noise", tmp_path / "face" / "GT"
    noises = faces.make_noises(3, size=32, seed=5)
    assert faces.make_noises(2, size=32, seed=5)[1].equal(noises[1])  # prefix-stable
    gt_dir.mkdir(parents=True)
    for i, x in enumerate(noises):
        faces.save_noise(x, noise_dir / f"{i:02d}.pt")
        Image.fromarray(np.full((32, 32, 3), 10 * i, np.uint8)).save(gt_dir / f"{i:02d}.png")
    assert sorted(p.name for p in noise_dir.iterdir()) == ["00.pt", "01.pt", "02.pt"]  # no temporary files left
    loaded = faces.load_noises(noise_dir, size=32)
    assert len(loaded) == 3 and all(a.equal(b) and a.dtype == torch.float32 for a, b in zip(loaded, noises))
    # the course's format: a bare tensor that loads with weights_only=True
    assert torch.load(noise_dir / "00.pt", weights_only=True).shape == (1, 3, 32, 32)
    gt = faces.load_gt(gt_dir, size=32)
    assert gt.shape == (3, 32, 32, 3) and gt.dtype == np.uint8 and gt[2, 0, 0, 0] == 20
    with pytest.raises(DataError, match=r"lacks 03\.pt"):
        faces.load_noises(noise_dir, count=4, size=32)
    (tmp_path / "face" / "UNet.pt").write_bytes(b"")
    paths = faces.course_face_paths(tmp_path)
    assert paths == (noise_dir, gt_dir, tmp_path / "face" / "UNet.pt")
    assert faces.course_face_paths(tmp_path / "elsewhere") == (None, None, None)


def test_missing_noise_folder_lists_layout(tmp_path):
    with pytest.raises(DataError) as err:
        faces.load_noises(tmp_path / "face" / "noise")
    msg = str(err.value)
    assert str(tmp_path / "face" / "noise") in msg
    assert "face/noise/00.pt .. 09.pt" in msg and "face/GT/00.png .. 09.png" in msg and "face/UNet.pt" in msg


def test_noise_of_wrong_shape_names_file_and_shape(tmp_path):
    path = tmp_path / "00.pt"
    torch.save(torch.randn(1, 3, 128, 128), path)
    with pytest.raises(DataError) as err:
        faces.load_noise(path)
    msg = str(err.value)
    assert str(path) in msg and "(1, 3, 128, 128)" in msg and "expected a float tensor of shape (1, 3, 256, 256)" in msg


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"\x00garbage that is not a torch file", "corrupt"),
    ("dict", "holds a dict"),
    ("int", "holds a torch.int64 tensor"),
])
def test_bad_noise_files(tmp_path, content, reason):
    path = tmp_path / "01.pt"
    if content == "dict":
        torch.save({"noise": torch.randn(1, 3, 256, 256)}, path)
    elif content == "int":
        torch.save(torch.zeros(1, 3, 256, 256, dtype=torch.int64), path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        faces.load_noise(path)
    assert str(path) in str(err.value) and reason in str(err.value) and "(1, 3, 256, 256)" in str(err.value)


class _Evil:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_malicious_noise_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "00.pt"
    torch.save(_Evil(marker), path)
    assert not marker.exists()
    with pytest.raises(DataError) as err:
        faces.load_noise(path)
    assert str(path) in str(err.value) and "refused" in str(err.value) and "never executed" in str(err.value)
    assert not marker.exists()
    # a plain (non-zip) pickle with code is refused as well
    path.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(DataError):
        faces.load_noise(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- offline default
def test_offline_rebuild_same_seed_same_checksum(data_dir):
    first = digits.build_offline("usps", seed=0)
    again = digits.build_offline("usps", seed=0)
    assert first["checksum"] == again["checksum"] and first["counts"] == again["counts"]
    stored = json.loads((data_dir / "offline" / "usps" / "manifest.json").read_text())
    assert stored["checksum"] == first["checksum"] and stored["seed"] == 0 and "scikit-learn" in stored["packages"]
    f1 = faces.build_offline_faces(32, seed=0)
    f2 = faces.build_offline_faces(32, seed=0)
    assert f1["checksum"] == f2["checksum"] and f1["counts"]["faces"] == 100
    assert "scikit-image" in f1["packages"]
    ds = digits.load_domain("usps", "val", source="offline")
    assert ds.manifest["checksum"] == first["checksum"] and ds.manifest["split"] == "val"
    # a cache from an older recipe, or an unreadable manifest, is rebuilt rather than served
    manifest_path = data_dir / "offline" / "usps" / "manifest.json"
    for text in (json.dumps({**stored, "version": 0}), "{ not json"):
        manifest_path.write_text(text)
        ds = digits.load_domain("usps", "train", source="offline")
        assert ds.manifest["checksum"] == first["checksum"]
        assert json.loads(manifest_path.read_text())["version"] == digits.OFFLINE_VERSIONS["usps"]


def test_offline_usps_is_usps_sized_grey_and_split_by_source_digit(data_dir):
    manifest = digits.build_offline("usps", seed=0)
    copies = manifest["copies_per_digit"]
    # 1,797 UCI digits split 80/20 per class, every digit `copies` times, each copy warped differently
    assert manifest["counts"] == {"train": 1438 * copies, "val": 359 * copies}
    train = digits.load_domain("usps", "train", source="offline")
    img = train.images.astype(np.int16)
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])  # grey
    assert np.bincount(train.labels, minlength=10).min() >= 0.9 * len(train) / 10 * 0.9
    # white strokes on black, filling the frame (USPS-style): dark corners, bright strokes reaching the edges
    assert img[:, :3, :3, 0].mean() < 30 and img[..., 0].max() == 255
    rows = (img[..., 0] > 128).any(axis=2)
    assert rows[:, :6].any(axis=1).mean() > 0.5 and rows[:, -6:].any(axis=1).mean() > 0.5
    # the warp makes copies of one digit differ: no two training images are identical
    assert len(np.unique(train.images.reshape(len(train), -1), axis=0)) == len(train)


@pytest.mark.slow
@pytest.mark.parametrize("domain", ["mnistm", "svhn"])
def test_offline_rebuild_matches_cached_checksum(domain, tmp_path, monkeypatch):
    digits.load_domain(domain, "train", source="offline")  # the repository's cache (built if absent)
    cached = json.loads((digits.offline_dir(domain) / "manifest.json").read_text())
    monkeypatch.setenv("HW2_DATA", str(tmp_path / "generated"))
    rebuilt = digits.build_offline(domain, seed=cached["seed"])
    assert rebuilt["checksum"] == cached["checksum"] and rebuilt["counts"] == cached["counts"]


@pytest.mark.parametrize("domain, min_train", [("mnistm", 10000), ("svhn", 20000), ("usps", 7000)])
def test_offline_domains_shapes_ranges_labels(domain, min_train):
    for split in ("train", "val"):
        ds = digits.load_domain(domain, split, source="offline")
        assert ds.source == "offline" and ds.manifest["source"] == "offline"
        assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (28, 28, 3)
        assert set(np.unique(ds.labels).tolist()) == set(range(10))
        assert ds.manifest["counts"][split] == len(ds)
        spread = ds.images.reshape(len(ds), -1).astype(np.float32).std(1)
        assert (spread > 3).mean() > 0.99  # images, not blank squares
    assert len(digits.load_domain(domain, "train", source="offline")) >= min_train
    if domain == "svhn":
        assert ds.manifest["fonts"] and "matplotlib" in ds.manifest["packages"]
        colour = np.abs(ds.images[..., 0].astype(int) - ds.images[..., 2]).mean()
        assert colour > 3  # RGB, not grey


def test_offline_faces_are_the_lfw_faces_at_power_of_two(data_dir):
    import skimage.data

    images, manifest = faces.offline_faces(32)
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    assert manifest["counts"]["faces"] == 100 and manifest["size"] == 32
    assert np.array_equal(images[..., 0], images[..., 2])  # grey replicated to RGB
    # the faces (first 100 of lfw_subset), not the non-face crops
    small = torch.nn.functional.interpolate(torch.from_numpy(images[..., 0]).float()[:, None] / 255, size=(25, 25),
                                            mode="bilinear", antialias=True, align_corners=False)[:, 0].numpy()
    lfw = np.asarray(skimage.data.lfw_subset(), dtype=np.float32)
    lfw = lfw / 255 if lfw.max() > 1.5 else lfw
    assert np.abs(small - lfw[:100]).mean() < 0.05 < np.abs(small - lfw[100:]).mean()
    assert faces.load_offline_faces(16).shape == (100, 16, 16, 3)
    with pytest.raises(ValueError, match="power of two"):
        faces.load_offline_faces(30)


def test_domain_samples_figure(tmp_path, data_dir):
    from hw2lib import plots

    write_domain(tmp_path, "usps", n=10, mode="L")
    rows = [digits.load_domain("usps", "train", data_root=tmp_path), ("faces (offline)", faces.load_offline_faces())]
    fig = plots.domain_samples_figure(rows)
    axes = fig.get_axes()
    assert len(axes) == 20
    assert axes[0].get_ylabel() == "usps (course)" and axes[10].get_ylabel() == "faces (offline)"
    assert [axes[c].get_title() for c in range(10)] == [str(c) for c in range(10)]
    import matplotlib.pyplot as plt

    plt.close(fig)
