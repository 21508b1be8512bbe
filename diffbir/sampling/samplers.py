"""Samplers: small functions over a `Denoiser` (k-diffusion style).

Every sampler takes an optional `x0_hook(x0, step) -> x0`, applied to each predicted clean latent
before the sampler uses it (restoration guidance is such a hook), an optional `noise` function for
all its random draws (in call order; default: torch's global generator) and an optional
`callback(i, x)` called with the state after step i (in the sampler's own space, see below).

Which code computes what:
* "ddpm": the reference's spaced DDPM (DiffBIR SpacedSampler) - not in diffusers, written here.
* "ddim", "dpm_solver_2m" (DPM-Solver++ 2M on evenly spaced timesteps), "euler", "dpmpp_2m",
  "dpmpp_2m_sde" (the last three on Karras sigmas): diffusers' DDIMScheduler,
  DPMSolverMultistepScheduler and EulerDiscreteScheduler, which compute the k-diffusion/paper
  updates. They are configured with the network's own parameterization (eps | v); a hook's x0 is
  converted back into it with the same schedule the denoiser used to get x0. DPMSolverMultistep
  rounds Karras timesteps to integers for the network (its update uses the exact sigmas).
* "euler_ancestral", "heun", "dpmpp_3m_sde": k-diffusion's functions on Karras sigmas. diffusers'
  counterparts differ: EulerAncestralDiscreteScheduler has no Karras sigmas and draws its own
  noise, HeunDiscreteScheduler has no zero-terminal-SNR option (sigma_T = inf), and
  DPMSolverMultistep's third-order SDE update has the opposite sign on the 0.5 of its second-
  difference term (an O(1) instead of an O(h) weight; k-diffusion defines DPM++ 3M SDE).
  DPMSolverSDEScheduler is DPM++ SDE (single step, torchsde), not one of these.
* "edm_*": the official v2.1 path (diffbir.sampling.edm): k-diffusion's solvers on the reference's
  own sigma schedule (sigma_max 1e4, nearest-sigma timesteps), with their EDMOptions.

The k-diffusion functions work in sigma space like k-diffusion (x = x0 + sigma * eps, starting at
x_T * sqrt(1 + sigma_max^2)); `sample()` takes and returns the variance-preserving latent for all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffbir.config import DiffusionConfig
from diffbir.sampling.denoiser import Denoiser, NoiseFn, Step, X0Hook, gaussian_noise
from diffbir.sampling.edm import EDM_SAMPLERS, EDMOptions, sample_edm
from diffbir.sampling.schedules import SpacedSchedule, train_betas

Callback = Callable[[int, torch.Tensor], None]


@torch.no_grad()
def sample_ddpm(
    den: Denoiser,
    x: torch.Tensor,
    schedule: SpacedSchedule,
    *,
    x0_hook: X0Hook | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The reference's spaced DDPM: x0 from the network, x <- posterior mean (coef1 x0 + coef2 x)
    + sqrt(posterior variance) * noise, no clipping. x: the latent at timesteps[-1]."""
    noise = noise or gaussian_noise()
    steps = len(schedule.timesteps)
    for i, idx in enumerate(reversed(range(steps))):
        t = schedule.timesteps[idx].item()
        x0 = den.x0(x, t)
        if x0_hook is not None:
            x0 = x0_hook(x0, Step(t, schedule.alphas_cumprod[idx].item(), schedule.alphas_cumprod_prev[idx].item()))
        mean = schedule.posterior_mean_coef1[idx].item() * x0 + schedule.posterior_mean_coef2[idx].item() * x
        z = noise(x, i)  # drawn at every step, the last one unused: the reference's call order
        x = mean + schedule.posterior_variance[idx].sqrt().item() * z if idx > 0 else mean
        if callback is not None:
            callback(i, x)
    return x


def _denoised(den: Denoiser, x: torch.Tensor, sigmas: list[float], i: int, x0_hook: X0Hook | None) -> torch.Tensor:
    """k-diffusion's D(x, sigma_i) for the sigma-space state x, then the hook."""
    sigma = sigmas[i]
    t = den.schedule.sigma_to_t(sigma)
    x0 = den.x0(x / math.sqrt(1 + sigma**2), t)
    if x0_hook is None:
        return x0
    return x0_hook(x0, Step(t, 1 / (1 + sigma**2), 1 / (1 + sigmas[i + 1] ** 2)))


@torch.no_grad()
def sample_euler_ancestral(
    den: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    x0_hook: X0Hook | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """k-diffusion sample_euler_ancestral (eta 1): Euler to sigma_down, then noise up to sigma_next."""
    noise = noise or gaussian_noise()
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = _denoised(den, x, s, i, x0_hook)
        sigma_up = math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
        sigma_down = math.sqrt(s[i + 1] ** 2 - sigma_up**2)
        x = x + (x - x0) / s[i] * (sigma_down - s[i])
        if s[i + 1] > 0:
            x = x + sigma_up * noise(x, i)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_heun(
    den: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    x0_hook: X0Hook | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """k-diffusion sample_heun (no churn): Heun's 2nd-order ODE step, Euler into sigma = 0."""
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        d = (x - _denoised(den, x, s, i, x0_hook)) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _denoised(den, x_2, s, i + 1, x0_hook)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    den: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    x0_hook: X0Hook | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """k-diffusion sample_dpmpp_3m_sde (eta 1; Gaussian noise per step instead of a Brownian tree)."""
    noise = noise or gaussian_noise()
    s = sigmas.tolist()
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(len(s) - 1):
        x0 = _denoised(den, x, s, i, x0_hook)
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i] / s[i + 1])  # step in log-SNR / 2
            h_eta = 2 * h
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * x0
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:  # third order from the last two x0 estimates
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (x0 - x0_1) / (h_1 / h)
            x = x + s[i + 1] * math.sqrt(-math.expm1(-2 * h)) * noise(x, i)
            x0_1, x0_2, h_1, h_2 = x0, x0_1, h, h_1
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_scheduler(
    den: Denoiser,
    x: torch.Tensor,
    scheduler,
    *,
    x0_hook: X0Hook | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run a diffusers scheduler (set_timesteps done, prediction_type = the network's) from the
    variance-preserving latent x at its first timestep. `noise` feeds `variance_noise` (SDE schedulers)."""
    timesteps = scheduler.timesteps
    x = x / scheduler.scale_model_input(torch.ones(()), timesteps[0])  # to the scheduler's state (VE for Euler)
    if hasattr(scheduler, "sigmas"):  # the scheduler's own noise levels, 0 at the end
        levels = (1 / (1 + scheduler.sigmas.double() ** 2)).tolist()
    else:  # DDIM: the training levels of its timesteps, then clean
        levels = [den.schedule.alpha_bar(t).item() for t in timesteps] + [1.0]
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        out = den(x_in, t)
        if x0_hook is not None:
            x0 = x0_hook(den.to_x0(out, x_in, t), Step(float(t), levels[i], levels[i + 1]))
            out = den.from_x0(x0, x_in, t)
        extra = {"variance_noise": noise(x, i)} if noise is not None else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
        if callback is not None:
            callback(i, x)
    return x


def scheduler_config(cfg: DiffusionConfig) -> dict:
    """diffusers scheduler arguments for the training schedule. The betas are passed as computed
    here (already zero-terminal-SNR where configured); rescale_betas_zero_snr then only makes
    sigma-space schedulers use alpha_bar_T = 2**-24 instead of 0."""
    return dict(
        num_train_timesteps=cfg.timesteps,
        trained_betas=train_betas(cfg).numpy(),
        rescale_betas_zero_snr=cfg.zero_snr,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[cfg.parameterization],
    )


_DIFFUSERS = {  # name: (scheduler class, its options)
    "ddim": (DDIMScheduler, dict(timestep_spacing="trailing", clip_sample=False)),
    "dpm_solver_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", timestep_spacing="trailing")),
    "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=True, timestep_spacing="linspace")),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", use_karras_sigmas=True)),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
}
_K_DIFFUSION = {"euler_ancestral": sample_euler_ancestral, "heun": sample_heun, "dpmpp_3m_sde": sample_dpmpp_3m_sde}
SAMPLERS = ("ddpm", *_DIFFUSERS, *_K_DIFFUSION, *EDM_SAMPLERS)
# the platform's samplers that draw noise every step (the EDM solvers all take a noise function)
STOCHASTIC = frozenset({"ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"})


def make_scheduler(sampler: str, cfg: DiffusionConfig, steps: int):
    cls, options = _DIFFUSERS[sampler]
    scheduler = cls(**scheduler_config(cfg), **options)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):  # rounded Karras timesteps repeat: don't find the start by value
        scheduler.set_begin_index(0)
    return scheduler


def sample(
    den: Denoiser,
    x_T: torch.Tensor,
    sampler: str = "ddpm",
    steps: int = 50,
    *,
    x0_hook: X0Hook | None = None,
    noise: NoiseFn | None = None,
    callback: Callback | None = None,
    edm: EDMOptions | None = None,
) -> torch.Tensor:
    """Sample z_0 from x_T, the variance-preserving latent at the last training timestep (every
    sampler here starts there), with `steps` steps of `sampler` (one of SAMPLERS); `edm`: the
    hyper-parameters of the edm_* solvers."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler in EDM_SAMPLERS:
        return sample_edm(
            den, x_T, sampler, steps, options=edm, x0_hook=x0_hook, noise=noise or gaussian_noise(), callback=callback
        )
    hooks = dict(x0_hook=x0_hook, callback=callback)
    if sampler in STOCHASTIC:
        hooks["noise"] = noise or gaussian_noise()
    if sampler == "ddpm":
        return sample_ddpm(den, x_T, SpacedSchedule.create(den.schedule, steps), **hooks)
    if sampler in _K_DIFFUSION:
        sigmas = den.schedule.karras_sigmas(steps)
        return _K_DIFFUSION[sampler](den, x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, **hooks)
    return sample_scheduler(den, x_T, make_scheduler(sampler, den.config, steps), **hooks)
