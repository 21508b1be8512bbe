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
* "euler_ancestral", "heun", "dpmpp_3m_sde": k-diffusion's samplers on Karras sigmas, run by the
  edm module's solvers of the same name (one implementation; the network sees the training
  timestep of each sigma, interpolated). diffusers' counterparts differ:
  EulerAncestralDiscreteScheduler has no Karras sigmas and draws its own noise,
  HeunDiscreteScheduler has no zero-terminal-SNR option (sigma_T = inf), and DPMSolverMultistep's
  third-order SDE update has the opposite sign on the 0.5 of its second-difference term (an O(1)
  instead of an O(h) weight; k-diffusion defines DPM++ 3M SDE).
  DPMSolverSDEScheduler is DPM++ SDE (single step, torchsde), not one of these.
* "edm_*": the official v2.1 path (diffbir.sampling.edm): k-diffusion's solvers on the reference's
  own sigma schedule (sigma_max 1e4, nearest-sigma timesteps), with their EDMOptions.

The k-diffusion functions work in sigma space like k-diffusion (x = x0 + sigma * eps, starting at
x_T * sqrt(1 + sigma_max^2)); `sample()` takes and returns the variance-preserving latent for all.

Every sampler tells the hook its Step.x0_coef (denoiser.x0_coef: how far its next state moves per
unit change of x0). The spaced DDPM uses the hook's x0 in its update, as the reference does; every
other sampler applies it as a shift of its state (denoiser.StateGuidance), so one guidance scale
pushes alike whatever the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffbir.config import DiffusionConfig
from diffbir.sampling.denoiser import Denoiser, NoiseFn, StateGuidance, Step, X0Hook, gaussian_noise, x0_coef
from diffbir.sampling.edm import EDM_SAMPLERS, EDMOptions, sample_edm, sample_sigmas
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
            # the reference's divisor: x0_coef(alpha_bar, alpha_bar_prev) in the schedule's own float64 numbers
            x0 = x0_hook(x0, Step(t, schedule.alphas_cumprod[idx].item(), schedule.posterior_mean_coef1[idx].item()))
        mean = schedule.posterior_mean_coef1[idx].item() * x0 + schedule.posterior_mean_coef2[idx].item() * x
        z = noise(x, i)  # drawn at every step, the last one unused: the reference's call order
        x = mean + schedule.posterior_variance[idx].sqrt().item() * z if idx > 0 else mean
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
    eta: float = 0.0,
) -> torch.Tensor:
    """Run a diffusers scheduler (set_timesteps done, prediction_type = the network's) from the
    variance-preserving latent x at its first timestep. `noise` feeds `variance_noise` (SDE schedulers);
    `eta`: the scheduler's fresh noise (0: an ODE solver), for the hook's x0_coef."""
    timesteps = scheduler.timesteps
    x = x / scheduler.scale_model_input(torch.ones(()), timesteps[0])  # to the scheduler's state (VE for Euler)
    if hasattr(scheduler, "sigmas"):  # the scheduler's own noise levels, 0 at the end
        levels = (1 / (1 + scheduler.sigmas.double() ** 2)).tolist()
    else:  # DDIM: the training levels of its timesteps, then clean
        levels = [den.schedule.alpha_bar(t).item() for t in timesteps] + [1.0]
    guidance = StateGuidance(x0_hook) if x0_hook is not None else None
    ve = isinstance(scheduler, EulerDiscreteScheduler)  # its state is x0 + sigma * eps, not VP
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(x, t)
        out = den(x_in, t)
        if guidance is not None:
            step = Step(float(t), levels[i], x0_coef(levels[i], levels[i + 1], eta))
            guidance.observe(den.to_x0(out, x_in, t), step)
        extra = {"variance_noise": noise(x, i)} if noise is not None else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
        if guidance is not None:
            x = guidance.apply(x, 1 / math.sqrt(levels[i + 1]) if ve else 1.0)
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


_DIFFUSERS = {  # name: (scheduler class, its options); only dpmpp_2m_sde adds fresh noise
    "ddim": (DDIMScheduler, dict(timestep_spacing="trailing", clip_sample=False)),
    "dpm_solver_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", timestep_spacing="trailing")),
    "euler": (EulerDiscreteScheduler, dict(use_karras_sigmas=True, timestep_spacing="linspace")),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", use_karras_sigmas=True)),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
}
# k-diffusion's samplers on Karras sigmas: the EDM solvers of the same name with the default hyper-parameters
_K_DIFFUSION = {"euler_ancestral": "edm_euler_a", "heun": "edm_heun", "dpmpp_3m_sde": "edm_dpm++_3m_sde"}
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
    if sampler in _K_DIFFUSION:
        sigmas = den.schedule.karras_sigmas(steps).tolist()
        solver = _K_DIFFUSION[sampler]
        return sample_sigmas(
            den, x_T, solver, sigmas, den.schedule.sigma_to_t, None, x0_hook, noise or gaussian_noise(), callback
        )
    hooks = dict(x0_hook=x0_hook, callback=callback)
    if sampler in STOCHASTIC:
        hooks["noise"] = noise or gaussian_noise()
    if sampler == "ddpm":
        return sample_ddpm(den, x_T, SpacedSchedule.create(den.schedule, steps), **hooks)
    eta = 1.0 if sampler in STOCHASTIC else 0.0
    return sample_scheduler(den, x_T, make_scheduler(sampler, den.config, steps), eta=eta, **hooks)
