import torch

from iomm.config import FlowConfig
from iomm.generator.flow import (
    euler_sample,
    guided,
    interpolate,
    sample_timesteps,
    velocity_from_sample,
    velocity_target,
)


def test_interpolation_and_target():
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt = interpolate(x, z, t)
    assert torch.allclose(xt[0], x[0]) and torch.allclose(xt[3], z[3])
    assert torch.allclose(xt[1], 0.75 * x[1] + 0.25 * z[1])
    # The target is the time derivative of the path.
    eps = 1e-3
    derivative = (interpolate(x, z, t + eps) - interpolate(x, z, t)) / eps
    assert torch.allclose(derivative, velocity_target(x, z), atol=1e-3)


def test_euler_sampler_recovers_a_point_mass():
    # For data concentrated at x0 the exact velocity is (x_t - x0) / t; Euler on straight paths is exact.
    x0 = torch.randn(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    out = euler_sample(lambda x, t: (x - x0) / t.view(-1, 1, 1, 1), noise, steps=7)
    assert torch.allclose(out, x0, atol=1e-4)


def test_euler_sampler_maps_gaussian_to_gaussian():
    # Data N(mu, s^2): the exact velocity field carries N(0, 1) noise to N(mu, s^2).
    mu, s = 2.0, 0.5

    def velocity(x, t):
        t = t.view(-1, 1)
        var = (1 - t) ** 2 * s**2 + t**2
        mean = (1 - t) * mu
        # E[z - x0 | x_t] for jointly Gaussian x0, z.
        return (t - (1 - t) * s**2) / var * (x - mean) - mu

    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    out = euler_sample(velocity, noise, steps=200)
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - s) < 0.02


def test_cfg_scale_one_is_the_conditional_prediction():
    calls = []

    def velocity(x, t, conditional):
        calls.append(conditional)
        return x + (1.0 if conditional else -1.0)

    x, t = torch.zeros(2, 3), torch.ones(2)
    assert torch.equal(guided(velocity, 1.0)(x, t), x + 1.0)
    assert calls == [True]
    assert torch.allclose(guided(velocity, 3.0)(x, t), x - 1.0 + 3.0 * 2.0)


def test_timestep_sampling_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    for scheme in ("uniform", "logit_normal"):
        t = sample_timesteps(FlowConfig(timestep_sampling=scheme), 5000, g)
        assert t.min() > 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    logit = sample_timesteps(FlowConfig(timestep_sampling="logit_normal"), 5000, g)
    uniform = sample_timesteps(FlowConfig(timestep_sampling="uniform"), 5000, g)
    assert ((logit - 0.5).abs() < 0.25).float().mean() > ((uniform - 0.5).abs() < 0.25).float().mean() + 0.1


def test_sample_prediction_gives_the_true_velocity_and_the_sampler_recovers_the_point_mass():
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.1, 0.3, 0.7, 1.0])
    # A perfect x-prediction implies exactly the velocity target.
    assert torch.allclose(velocity_from_sample(interpolate(x, z, t), x, t, min_t=0.05), velocity_target(x, z),
                          atol=1e-5)
    # A model that always predicts x0 drives Euler sampling to x0 (exactly while t stays above min_t; the
    # scheduler's last step starts at t = 0.001, where the 0.05 clamp leaves 0.98 of x_t - x0 = 0.001 (z - x0)).
    x0 = x[:2]
    out = euler_sample(lambda xt, tt: velocity_from_sample(xt, x0, tt, min_t=1e-4), z[:2], steps=7)
    assert torch.allclose(out, x0, atol=1e-4)
    out = euler_sample(lambda xt, tt: velocity_from_sample(xt, x0, tt, min_t=0.05), z[:2], steps=7)
    assert (out - x0).abs().max() <= 0.001 * (z[:2] - x0).abs().max()
    # t is clamped in the division: no blow-up at t = 0.
    v = velocity_from_sample(x, torch.zeros_like(x), torch.zeros(4), min_t=0.05)
    assert torch.allclose(v, x / 0.05)
