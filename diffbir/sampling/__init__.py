"""Sampling: noise schedules, the denoiser interface, samplers and restoration guidance."""

from diffbir.sampling.denoiser import (
    Denoiser,
    NoiseFn,
    StateGuidance,
    Step,
    X0Hook,
    cfg_model,
    gaussian_noise,
    initial_latent,
    stored_noise,
    x0_coef,
)
from diffbir.sampling.edm import EDM_SAMPLERS, EDMOptions
from diffbir.sampling.guidance import RestorationGuidance, guidance_loss, weight_map
from diffbir.sampling.samplers import SAMPLERS, sample
from diffbir.sampling.schedules import NoiseSchedule, SpacedSchedule, space_timesteps, train_betas

__all__ = [
    "EDM_SAMPLERS",
    "SAMPLERS",
    "Denoiser",
    "EDMOptions",
    "NoiseFn",
    "NoiseSchedule",
    "RestorationGuidance",
    "SpacedSchedule",
    "StateGuidance",
    "Step",
    "X0Hook",
    "cfg_model",
    "gaussian_noise",
    "guidance_loss",
    "initial_latent",
    "sample",
    "space_timesteps",
    "stored_noise",
    "train_betas",
    "weight_map",
    "x0_coef",
]
