"""FaceUNet against the course's face UNet: state_dict layout, float64 output, and safe loading.

The reference files live in ``../shared/course/`` (beside the repository); tests that need
them skip with a reason where that folder is absent.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from hw2lib.checkpoint import CheckpointError
from hw2lib.course_unet import FaceUNet, TimeEmbedding, load_course_unet

COURSE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "course"
SPEC = COURSE_DIR / "state_dict_spec.json"
EXPECTED = COURSE_DIR / "expected_out_float64.npy"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"course reference file {path} is absent (expected in ../shared/course/ beside the repo)")
    return path


def fill_deterministic_weights(model: torch.nn.Module) -> None:
    """Write the README's weights in place (float64 model): per-key generator seeded with crc32(key).

    ``time.0.inv_freq`` is kept as constructed (float32 values, cast to the model's dtype).
    """
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key == "time.0.inv_freq":
                value.copy_(TimeEmbedding(value.numel() * 2).inv_freq)
                continue
            g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            r = torch.randn(value.shape, generator=g, dtype=torch.float64)
            if r.dim() >= 2:
                value.copy_(r.div_(math.sqrt(r.numel() // r.shape[0])))
            elif key.endswith("weight"):
                value.copy_(r.mul_(0.1).add_(1))
            else:
                value.copy_(r.mul_(0.1))


def reference_input() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.sin(0.011 * torch.arange(2 * 3 * 64 * 64, dtype=torch.float64)).reshape(2, 3, 64, 64)
    return x, torch.tensor([10, 500])


def lazy_state_dict(keys_shapes) -> dict[str, torch.Tensor]:
    """A full-size state_dict whose tensors are stride-0 views of one zero, so it saves to a tiny file."""
    return {key: torch.zeros(1).expand(*shape) for key, shape in keys_shapes}


def meta_keys_shapes() -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = FaceUNet()
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.fixture(scope="module")
def spec() -> dict:
    return json.loads(_need(SPEC).read_text())


@pytest.fixture(scope="module")
def expected() -> torch.Tensor:
    return torch.from_numpy(np.load(_need(EXPECTED)))


@pytest.fixture(scope="module")
def model64() -> FaceUNet:
    """FaceUNet in float64 with the README's deterministic weights (built once: ~114 M parameters)."""
    with torch.device("meta"):
        model = FaceUNet()
    # no random init: every entry is overwritten below
    model = model.to_empty(device="cpu").double().eval()
    fill_deterministic_weights(model)
    return model


@pytest.fixture(scope="module")
def out64(model64, expected) -> torch.Tensor:
    x, t = reference_input()
    with torch.no_grad():
        return model64(x, t)


def test_state_dict_keys_and_shapes_match_spec_in_order(spec):
    with torch.device("meta"):
        model = FaceUNet()
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    theirs = [[k, list(s)] for k, s in spec["state_dict"]]
    assert len(ours) == len(theirs)
    assert ours == theirs
    # the spec's count covers every state_dict entry (parameters plus the 64-entry inv_freq buffer)
    assert sum(v.numel() for v in model.state_dict().values()) == spec["parameters"]
    assert sum(p.numel() for p in model.parameters()) == spec["parameters"] - 64


def test_time_embedding_buffer():
    embed = TimeEmbedding(128)
    expected = torch.exp(torch.arange(0, 128, 2, dtype=torch.float32) * (-math.log(10000) / 128))
    assert torch.equal(embed.inv_freq, expected)
    emb = embed(torch.tensor([0, 7]))
    assert emb.shape == (2, 128)
    assert torch.allclose(emb[1], torch.cat([torch.sin(7 * expected), torch.cos(7 * expected)]))


def test_float64_output_matches_course(out64, expected):
    assert out64.shape == expected.shape == (2, 3, 64, 64)
    assert out64.dtype == torch.float64
    err = (out64 - expected).abs().max().item()
    assert err < 1e-9, f"max abs error {err:.3e} against {EXPECTED}"


def test_zeroing_an_attention_projection_is_detected(model64, out64, expected):
    param = model64.up7.attention.out.weight  # moves the output by ~0.09 (mid1.attention.out: ~0.018)
    saved = param.detach().clone()
    x, t = reference_input()
    try:
        with torch.no_grad():
            param.zero_()
            moved = model64(x, t)
    finally:
        with torch.no_grad():
            param.copy_(saved)
    assert (moved - out64).abs().max().item() > 1e-2
    assert (moved - expected).abs().max().item() > 1e-2


def test_load_course_unet_round_trip(tmp_path, model64, expected):
    # as the course ships it: a bare float32 state_dict
    state_dict = {k: v.float() for k, v in model64.state_dict().items()}
    path = tmp_path / "UNet.pt"
    torch.save(state_dict, path)
    loaded = load_course_unet(path)
    assert isinstance(loaded, FaceUNet) and not loaded.training
    got = loaded.state_dict()
    assert list(got) == list(state_dict)
    for key, value in state_dict.items():
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], value), key
    x, t = reference_input()
    with torch.no_grad():
        out32 = loaded(x.float(), t)
    assert out32.dtype == torch.float32
    # README: the same network run in float32 differs from the float64 file by about 6e-6
    assert (out32.double() - expected).abs().max().item() < 5e-5


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "ema", "module."])
def test_load_accepts_wrapped_state_dict(tmp_path, wrapper):
    state_dict = lazy_state_dict(meta_keys_shapes())
    state_dict["out.2.bias"] = torch.tensor([1.0, 2.0, 3.0])
    if wrapper == "module.":  # saved from a DataParallel-wrapped model
        payload = {"module." + k: v for k, v in state_dict.items()}
    else:
        payload = {wrapper: state_dict, "step": 123}
    path = tmp_path / "UNet.pt"
    torch.save(payload, path)
    model = load_course_unet(path)
    assert torch.equal(model.out[2].bias, torch.tensor([1.0, 2.0, 3.0]))
    assert model.mid1.resblocks.conv1.weight.abs().sum().item() == 0


def test_dict_without_a_state_dict_is_named(tmp_path):
    path = tmp_path / "optimizer_only.pt"
    torch.save({"optimizer": {"lr": 1.0}, "step": 3}, path)
    with pytest.raises(CheckpointError, match="no state_dict") as info:
        load_course_unet(path)
    assert str(path) in str(info.value) and "optimizer" in str(info.value)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state_dict = lazy_state_dict(meta_keys_shapes())
    del state_dict["mid1.attention.qkv.weight"]
    state_dict["mid1.attention.proj.weight"] = torch.zeros(4)
    path = tmp_path / "broken_UNet.pt"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError) as info:
        load_course_unet(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys" in message and "mid1.attention.qkv.weight" in message
    assert "unexpected keys" in message and "mid1.attention.proj.weight" in message


def test_shape_mismatch_is_named(tmp_path):
    state_dict = lazy_state_dict(meta_keys_shapes())
    state_dict["out.2.weight"] = torch.zeros(1, 128, 3, 3)
    path = tmp_path / "UNet_1ch.pt"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"out\.2\.weight") as info:
        load_course_unet(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"this is not a torch checkpoint\n", b"", b"PK\x03\x04truncated zip"])
def test_garbage_file_gives_clear_error(tmp_path, content):
    path = tmp_path / "UNet.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read course UNet checkpoint") as info:
        load_course_unet(path)
    assert str(path) in str(info.value)


def test_missing_file_and_non_state_dict_are_named(tmp_path):
    path = tmp_path / "nowhere" / "UNet.pt"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_course_unet(path)
    assert str(path) in str(info.value)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(CheckpointError, match="expected a state_dict") as info:
        load_course_unet(listed)
    assert str(listed) in str(info.value)


def test_forward_rejects_bad_shapes():
    with torch.device("meta"):
        model = FaceUNet()
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.zeros(1, 3, 48, 64, device="meta"), torch.tensor([1], device="meta"))
    with pytest.raises(ValueError, match="1-D tensor of 2 timesteps"):
        model(torch.zeros(2, 3, 64, 64, device="meta"), torch.tensor([1, 2, 3], device="meta"))
