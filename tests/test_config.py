import dataclasses

import pytest

from hw2lib import config


@pytest.mark.parametrize("part", ["ddpm", "ddim", "dann"])
def test_profiles_exist_and_differ(part):
    cfgs = {p: config.from_params(part, profile=p) for p in config.PROFILES}
    assert {c.profile for c in cfgs.values()} == set(config.PROFILES)
    as_dicts = {p: {k: v for k, v in config.as_dict(c).items() if k != "profile"} for p, c in cfgs.items()}
    assert as_dicts["smoke"] != as_dicts["quick"] != as_dicts["full"]
    # full targets the real course data on a GPU; quick and smoke run on the offline default
    assert cfgs["full"].data_source == "course"
    assert cfgs["quick"].data_source == "auto"


def test_smoke_is_smaller_than_quick():
    smoke, quick = config.from_params("ddpm", profile="smoke"), config.from_params("ddpm", profile="quick")
    assert smoke.base_channels < quick.base_channels
    assert smoke.train_steps < quick.train_steps
    assert smoke.n_per_digit < quick.n_per_digit == 100


def test_overrides_apply_and_none_means_default():
    cfg = config.from_params("ddpm", profile="quick", guidance=4.0, seed=None)
    assert cfg.guidance == 4.0
    assert cfg.seed == config.DDPMConfig().seed
    assert config.from_params("ddim", profile="quick", etas=[0.0, 1.0]).etas == (0.0, 1.0)


def test_unknown_key_rejected_with_allowed_keys():
    with pytest.raises(TypeError) as err:
        config.from_params("ddpm", profile="quick", guidence=2.0)
    msg = str(err.value)
    assert "guidence" in msg and "guidance" in msg and "seed" in msg


def test_unknown_profile_and_part():
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        config.from_params("ddpm", profile="fast")
    with pytest.raises(ValueError, match="unknown part"):
        config.from_params("gan")


def test_wrong_type_rejected():
    with pytest.raises(TypeError, match="guidance"):
        config.from_params("ddpm", guidance="strong")
    with pytest.raises(TypeError, match="interactive"):
        config.from_params("ddim", interactive="yes")
    assert config.from_params("ddpm", guidance=2).guidance == 2  # an int where a float is expected is fine


def test_as_dict_is_plain():
    d = config.as_dict(config.from_params("ddpm"))
    assert isinstance(d["channel_mults"], list)
    assert set(d) == {f.name for f in dataclasses.fields(config.DDPMConfig)}


def test_gpu_fast_path_only_in_full():
    full, quick, smoke = (config.from_params("ddpm", profile=p) for p in ("full", "quick", "smoke"))
    assert (full.autocast, full.channels_last, full.compile) == ("bf16", True, False)
    assert (quick.autocast, quick.channels_last, quick.compile) == ("bf16", False, False)
    assert (smoke.channels_last, smoke.compile) == (False, False)
