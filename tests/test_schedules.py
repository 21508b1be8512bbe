"""Noise schedules: fixture d (training and spaced schedules, v2 and v2.1) plus the properties the
samplers rely on (fractional timesteps, Karras sigmas, diffusers configured the same way)."""

from __future__ import annotations

import math

import pytest
import torch

from diffbir.config import DiffusionConfig
from diffbir.sampling.denoiser import x0_coef
from diffbir.sampling.samplers import _DIFFUSERS, make_scheduler
from diffbir.sampling.schedules import NoiseSchedule, SpacedSchedule, space_timesteps

from conftest import load_fixture

# fixture d names the spaced alpha_bar after where it is taken
_ATTRIBUTE = {"alphas_cumprod_at_timesteps": "alphas_cumprod"}


@pytest.fixture(scope="module")
def fixture_d(golden):
    return load_fixture(golden, "d_schedules")


def _config(tiny_configs, prefix: str) -> DiffusionConfig:
    """Fixture d's `v2` / `v2_1` schedules are the set's `diffusion_v2` / `diffusion_v2_1` configs."""
    return DiffusionConfig(**tiny_configs[f"diffusion_{prefix}"]["params"])


def _groups(fixture_d) -> list[tuple[str, str]]:
    return sorted({tuple(name.split(".")[:2]) for name in fixture_d})


def _assert_buffer(actual: torch.Tensor, golden: torch.Tensor, name: str) -> None:
    """float64 values to rtol 1e-12, float32 buffers to 1e-6 (inf must match inf), README §7."""
    if golden.dtype == torch.float64:
        torch.testing.assert_close(actual, golden, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")
    else:
        torch.testing.assert_close(actual.to(golden.dtype), golden, rtol=1e-6, atol=0, msg=lambda m: f"{name}: {m}")


def test_fixture_d_covers_both_schedules(fixture_d, tiny_configs):
    groups = _groups(fixture_d)
    assert {p for p, _ in groups} == {"v2", "v2_1"}
    assert {g for _, g in groups} == {"train", "spaced50", "spacedN"}


@pytest.mark.parametrize("prefix", ["v2", "v2_1"])
def test_fixture_d_train(fixture_d, tiny_configs, prefix):
    schedule = NoiseSchedule.from_config(_config(tiny_configs, prefix))
    acp = schedule.alphas_cumprod
    mine = {
        "betas": schedule.betas,
        "alphas_cumprod": acp,
        "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - acp).sqrt(),
    }
    names = [n for n in fixture_d if n.startswith(f"{prefix}.train.")]
    assert names
    for name in names:
        _assert_buffer(mine[name.split(".")[-1].removesuffix("_f64")], fixture_d[name], name)


@pytest.mark.parametrize("prefix", ["v2", "v2_1"])
@pytest.mark.parametrize("group", ["spaced50", "spacedN"])
def test_fixture_d_spaced(fixture_d, tiny_configs, prefix, group):
    golden_timesteps = fixture_d[f"{prefix}.{group}.timesteps"]
    spaced = SpacedSchedule.create(NoiseSchedule.from_config(_config(tiny_configs, prefix)), len(golden_timesteps))
    assert spaced.timesteps.tolist() == golden_timesteps.tolist()
    names = [n for n in fixture_d if n.startswith(f"{prefix}.{group}.") and not n.endswith(".timesteps")]
    assert len(names) >= 10
    for name in names:
        buffer = name.split(".")[-1].removesuffix("_f64")
        _assert_buffer(getattr(spaced, _ATTRIBUTE.get(buffer, buffer)), fixture_d[name], name)


def test_space_timesteps_python_round():
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(10, 10) == list(range(10))
    # stride 2.5: round(2.5) = 2 and round(7.5) = 8 (half to even)
    assert space_timesteps(11, 5) == [0, 2, 5, 8, 10]
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_zero_terminal_snr():
    v2, v21 = NoiseSchedule.from_config(DiffusionConfig()), NoiseSchedule.from_config(DiffusionConfig.preset("v2.1"))
    assert v21.alphas_cumprod[-1] == 0 and v2.alphas_cumprod[-1] > 0
    assert v21.alphas_cumprod[0].item() == pytest.approx(v2.alphas_cumprod[0].item(), rel=1e-12)  # first step unchanged
    assert math.exp(v21.log_sigmas[-1].item()) == pytest.approx(2**12)  # sigma-space samplers: sigma_max 4096


@pytest.mark.parametrize("preset", ["v2", "v2.1"])
def test_fractional_timesteps(preset):
    schedule = NoiseSchedule.from_config(DiffusionConfig.preset(preset))
    t = torch.arange(schedule.num_timesteps)
    assert torch.equal(schedule.alpha_bar(t), schedule.alphas_cumprod)  # exact at training steps
    ab = schedule.alpha_bar(torch.linspace(0, 999, 7919, dtype=torch.float64))
    assert (ab.diff() < 0).all()  # interpolation stays monotonic
    for sigma in schedule.karras_sigmas(30)[:-1].tolist():
        t = schedule.sigma_to_t(sigma)
        assert 0 <= t <= schedule.num_timesteps - 1
        # (zero terminal SNR: the network's alpha_bar_T is 0, sigma_max stands for 2**-24)
        assert schedule.alpha_bar(t).item() == pytest.approx(1 / (1 + sigma**2), rel=1e-9, abs=1e-7)


def test_karras_sigmas():
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    sigmas = schedule.karras_sigmas(12, rho=7.0)
    assert len(sigmas) == 13 and sigmas[-1] == 0
    assert (sigmas.diff() < 0).all()
    sigma_of = lambda ab: math.sqrt((1 - ab) / ab)  # noqa: E731
    assert sigmas[0].item() == pytest.approx(sigma_of(schedule.alphas_cumprod[-1].item()))
    assert sigmas[-2].item() == pytest.approx(sigma_of(schedule.alphas_cumprod[0].item()))
    # evenly spaced in sigma^(1/rho)
    roots = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(11), rtol=1e-9, atol=0)


def test_x0_coef_is_each_samplers_weight_of_x0():
    """With fresh noise (eta 1) the weight is the spaced DDPM's posterior_mean_coef1; without (eta 0)
    it is DDIM's: x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps(x_t, x0); a step onto x0 weighs it 1."""
    spaced = SpacedSchedule.create(NoiseSchedule.from_config(DiffusionConfig()), 50)
    for i in range(1, 50):
        ab, ab_prev = spaced.alphas_cumprod[i].item(), spaced.alphas_cumprod_prev[i].item()
        assert x0_coef(ab, ab_prev) == pytest.approx(spaced.posterior_mean_coef1[i].item(), rel=1e-12)
        ddim = math.sqrt(ab_prev) - math.sqrt(1 - ab_prev) * math.sqrt(ab / (1 - ab))
        assert x0_coef(ab, ab_prev, eta=0) == pytest.approx(ddim, rel=1e-9)
        assert 0.4 < x0_coef(ab, ab_prev, eta=0) / x0_coef(ab, ab_prev) < 1  # about half for small steps
    assert x0_coef(0.3, 1.0) == x0_coef(0.3, 1.0, eta=0) == 1.0


@pytest.mark.parametrize("preset", ["v2", "v2.1"])
@pytest.mark.parametrize("sampler", list(_DIFFUSERS))
def test_diffusers_schedulers_use_the_training_schedule(preset, sampler):
    cfg = DiffusionConfig.preset(preset)
    scheduler = make_scheduler(sampler, cfg, 20)
    ours = NoiseSchedule.from_config(cfg).alphas_cumprod
    theirs = scheduler.alphas_cumprod.double()
    if cfg.zero_snr and hasattr(scheduler, "sigmas"):  # sigma-space: alpha_bar_T = 2**-24 instead of 0
        assert theirs[-1] == 2**-24
        ours, theirs = ours[:-1], theirs[:-1]
    torch.testing.assert_close(theirs, ours, rtol=2e-6, atol=1e-12)
    assert scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[cfg.parameterization]
    assert int(scheduler.timesteps[0]) == 999  # every sampler starts at the last training step
