"""Flow-map sampling against an analytic flow whose average velocity is known in closed form.

Data x0 ~ N(mu0, s0^2) per dimension, noise x1 ~ N(0, 1), linear paths z_t = (1 - t) x0 + t x1.
The marginal at t is N(m_t, sd_t^2) with m_t = (1 - t) mu0 and sd_t^2 = (1 - t)^2 s0^2 + t^2. The
probability-flow ODE of these marginals is the monotone (affine) transport between them,
z_r = m_r + (sd_r / sd_t) (z_t - m_t), so the average velocity over [r, t] is
u(z_t, r, t) = (z_t - z_r) / (t - r). A correct flow-map sampler lands on x0 = mu0 + s0 * x1 exactly,
for any number of steps.
"""
import pytest
import torch

from accel.solvers.flow_map import FlowMapSampler

MU0 = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
S0 = torch.tensor([0.5, 1.5, 0.1], dtype=torch.float64)


def mean_sd(t):
    return (1 - t) * MU0, torch.sqrt((1 - t) ** 2 * S0 ** 2 + t ** 2)


def transport(z, r, t):
    (m_t, sd_t), (m_r, sd_r) = mean_sd(t), mean_sd(r)
    return m_r + sd_r / sd_t * (z - m_t)


def average_velocity(z, r, t):
    return (z - transport(z, r, t)) / (t - r)


def instantaneous_velocity(z, t):
    # d/dt of the transport at r = t: dm/dt + (d sd/dt / sd) (z - m)
    m, sd = mean_sd(t)
    dsd = ((t - 1) * S0 ** 2 + t) / sd
    return -MU0 + dsd / sd * (z - m)


@pytest.mark.parametrize("steps", range(1, 9))
def test_flow_map_sampler_reproduces_the_exact_transport(steps):
    noise = torch.randn(4096, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    sampler = FlowMapSampler(shift=3.0 if steps % 2 else 1.0)
    out = sampler.sample(lambda z, r, t: average_velocity(z, r.double(), t.double()), noise, num_inference_steps=steps)
    torch.testing.assert_close(out, MU0 + S0 * noise, atol=1e-9, rtol=0)
    # ... hence the transported distribution: data mean and spread
    torch.testing.assert_close(out.mean(0), MU0, atol=0.06, rtol=0)
    torch.testing.assert_close(out.std(0), S0, atol=0.06, rtol=0)


def test_scheduler_interface_and_custom_sigmas():
    sampler = FlowMapSampler()
    sampler.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    assert sampler.sigmas.tolist() == [1.0, 0.6, 0.2, 0.0]
    torch.testing.assert_close(sampler.timesteps, torch.tensor([1000.0, 600.0, 200.0]))
    torch.testing.assert_close(sampler.r_timesteps, torch.tensor([600.0, 200.0, 0.0]))
    z = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = z.clone()
    for i, t in enumerate(sampler.timesteps):  # the loop a pipeline would run
        r_sigma, t_sigma = sampler.sigmas[i + 1], sampler.sigmas[i]
        x = sampler.step(average_velocity(x, r_sigma, t_sigma), t, x).prev_sample
    torch.testing.assert_close(x, MU0 + S0 * z, atol=1e-9, rtol=0)


def test_instantaneous_velocity_is_only_exact_in_the_limit():
    """Sanity check of the analytic flow: using u = v(z_t, t) (Euler) is wrong at few steps and
    converges to the same map as the step count grows, as the average velocity must."""
    noise = torch.randn(256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = MU0 + S0 * noise
    errors = []
    for steps in (2, 8, 512):
        out = FlowMapSampler().sample(lambda z, r, t: instantaneous_velocity(z, t.double()), noise,
                                      num_inference_steps=steps)
        errors.append(float((out - exact).abs().max()))
    assert errors[0] > 0.1 and errors[0] > errors[1] > errors[2] and errors[2] < 0.02


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowMapSampler().set_timesteps(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        FlowMapSampler().set_timesteps(sigmas=[0.5, 0.7])
    with pytest.raises(ValueError, match="shift"):
        FlowMapSampler(shift=0.0)
