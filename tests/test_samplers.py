import math

import pytest
import torch

from hw2lib import samplers
from hw2lib.schedule import NoiseSchedule, ddim_timesteps


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(1000, 1e-4, 2e-2)


def oracle(x0, schedule):
    """A model that predicts the true noise of a known x_0."""
    def eps(x, t):
        ab = schedule.alpha_bar(t).to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return eps


def test_timestep_conventions():
    seq, prev = ddim_timesteps(1000, 50, "ermon")
    assert seq[:3] == [980, 960, 940] and seq[-1] == 0 and prev[-1] == -1 and prev[0] == 960
    seq, prev = ddim_timesteps(1000, 50, "plus-one")
    assert seq[0] == 981 and seq[-1] == 1 and prev[-1] == 0
    with pytest.raises(ValueError, match="convention"):
        ddim_timesteps(1000, 50, "other")


def test_eta0_is_deterministic(schedule):
    torch.manual_seed(0)
    net = lambda x, t: 0.1 * x + 0.01 * t.float().reshape(-1, 1, 1, 1) / 1000  # noqa: E731
    x_T = torch.randn(2, 3, 8, 8)
    a = samplers.ddim_sample(net, x_T, schedule, steps=20, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = samplers.ddim_sample(net, x_T, schedule, steps=20, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = samplers.ddim_sample(net, x_T, schedule, steps=20, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_eta0_oracle_returns_x0(schedule):
    x0 = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = samplers.ddim_sample(oracle(x0, schedule), x_T, schedule, steps=50, eta=0.0, convention="ermon")
    assert torch.allclose(out, x0, atol=1e-8)


def test_eta1_all_steps_variance_is_ddpm_posterior(schedule):
    a_t, a_prev = schedule.alpha_bars[1:], schedule.alpha_bars[:-1]
    sigma = samplers.ddim_sigma(a_t, a_prev, 1.0)
    assert torch.allclose(sigma**2, schedule.posterior_variance[1:], rtol=1e-10, atol=1e-15)
    # and the sampler really uses it: one step of DDIM (1000 steps, eta=1) from x_t with a zero model
    x = torch.zeros(20000, 1, 1, 1, dtype=torch.float64)
    captured = {}

    def cb(i, t, xt):
        if i == 0:
            captured["x"] = xt.clone()
            raise StopIteration

    with pytest.raises(StopIteration):
        samplers.ddim_sample(lambda x, t: torch.zeros_like(x), x, schedule, steps=1000, eta=1.0,
                             generator=torch.Generator().manual_seed(0), callback=cb)
    var = float(captured["x"].var())
    assert var == pytest.approx(float(schedule.posterior_variance[999]), rel=0.03)


def test_ddpm_oracle_recovers_x0(schedule):
    x0 = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1
    x_T = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    out = samplers.ddpm_sample(oracle(x0, schedule), x_T, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-6)


def test_slerp_endpoints_norm_and_fallback():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    z1 = z1 / z1.norm() * z0.norm()
    assert torch.allclose(samplers.slerp(z0, z1, 0.0), z0, atol=1e-6)
    assert torch.allclose(samplers.slerp(z0, z1, 1.0), z1, atol=1e-6)
    for alpha in (0.25, 0.5, 0.8):
        assert float(samplers.slerp(z0, z1, alpha).norm()) == pytest.approx(float(z0.norm()), rel=1e-5)
        assert float(samplers.lerp(z0, z1, alpha).norm()) < float(z0.norm())
    # nearly parallel: falls back to lerp, no NaN
    out = samplers.slerp(z0, z0 * (1 + 1e-9), 0.3)
    assert torch.isfinite(out).all() and torch.allclose(out, samplers.lerp(z0, z0 * (1 + 1e-9), 0.3))
    assert math.isclose(float(samplers.lerp(z0, z1, 0.5).norm() / z0.norm()), 0.7, abs_tol=0.1)


def test_bad_eta_rejected(schedule):
    with pytest.raises(ValueError, match="eta"):
        samplers.ddim_sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), schedule, eta=1.5)
