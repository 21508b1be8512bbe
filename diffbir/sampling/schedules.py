"""Noise schedules (golden README §5 d): the training schedule the weights were made with, and the
spaced schedule of the reference's SpacedSampler. Everything is computed in float64, as the
reference does; the sampler casts coefficients to the latent's dtype where it uses them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from diffbir.config import DiffusionConfig

# sigma-space samplers cannot start at sigma = inf (zero terminal SNR): like diffusers'
# rescale_betas_zero_snr they use alpha_bar_T = 2**-24 there, i.e. sigma_max = 4096.
MIN_SIGMA_ALPHA_BAR = 2.0**-24


def train_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """SD's scaled-linear betas (ldm "linear": linspace of square roots, squared), optionally
    rescaled to zero terminal SNR (Lin et al. 2023, Algorithm 1; the same code as the reference)."""
    betas = torch.linspace(cfg.linear_start**0.5, cfg.linear_end**0.5, cfg.timesteps, dtype=torch.float64) ** 2
    return rescale_zero_terminal_snr(betas) if cfg.zero_snr else betas


class NoiseSchedule:
    """The discrete training schedule. Timesteps may be fractional (Karras sigmas fall between
    training steps): alpha_bar is then interpolated linearly in log sigma, as k-diffusion and
    diffusers do, so `alpha_bar(sigma_to_t(s)) == 1 / (1 + s**2)`."""

    def __init__(self, betas: torch.Tensor):
        self.betas = betas.to(torch.float64)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        ab = self.alphas_cumprod.clamp(min=MIN_SIGMA_ALPHA_BAR)
        self.log_sigmas = 0.5 * torch.log((1 - ab) / ab)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        return cls(train_betas(cfg))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: float | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        lo, hi = t.floor().long(), t.ceil().long()
        log_sigma = torch.lerp(self.log_sigmas[lo], self.log_sigmas[hi], t - lo)
        # training steps exactly (alpha_bar_T = 0 stays 0), in between 1 / (1 + sigma^2)
        return torch.where(lo == hi, self.alphas_cumprod[lo], torch.sigmoid(-2 * log_sigma))

    def sigma_to_t(self, sigma: float) -> float:
        """The (fractional) training timestep whose interpolated sigma is `sigma`."""
        log_sigma = torch.tensor(math.log(sigma), dtype=torch.float64)
        hi = int(torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, self.num_timesteps - 1))
        lo_s, hi_s = self.log_sigmas[hi - 1], self.log_sigmas[hi]
        return hi - 1 + ((log_sigma - lo_s) / (hi_s - lo_s)).clamp(0, 1).item()

    def karras_sigmas(self, steps: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. (2022) noise levels from the schedule's sigma_max to sigma_min, then 0
        (k-diffusion's get_sigmas_karras over the model's range)."""
        min_root, max_root = (self.log_sigmas[[0, -1]] / rho).exp()  # sigma ** (1 / rho)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        return torch.cat([(max_root + ramp * (min_root - max_root)) ** rho, torch.zeros(1, dtype=torch.float64)])


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The reference's space_timesteps(num_timesteps, str(steps)): evenly strided training steps
    including the first and the last, Python round (half to even) of an accumulated stride."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot take {steps} steps out of {num_timesteps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    taken, cur = set(), 0.0
    for _ in range(steps):
        taken.add(round(cur))
        cur += stride
    return sorted(taken)


@dataclass(frozen=True)
class SpacedSchedule:
    """SpacedSampler.make_schedule(steps): buffers indexed by the spaced index i (0 = the
    least noisy step); the network sees timesteps[i]. All float64."""

    timesteps: torch.Tensor  # int64, ascending
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def create(cls, schedule: NoiseSchedule, steps: int) -> SpacedSchedule:
        timesteps = torch.tensor(space_timesteps(schedule.num_timesteps, steps), dtype=torch.int64)
        acp_at = schedule.alphas_cumprod[timesteps]
        betas = 1 - acp_at / torch.cat([acp_at.new_ones(1), acp_at[:-1]])
        acp = torch.cumprod(1 - betas, dim=0)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        variance = betas * (1 - acp_prev) / (1 - acp)
        return cls(
            timesteps=timesteps,
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            sqrt_alphas_cumprod=acp.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - acp).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / acp).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / acp - 1).sqrt(),
            posterior_variance=variance,
            # index 0 has zero variance: the reference takes index 1's value there
            posterior_log_variance_clipped=torch.cat([variance[1:2], variance[1:]]).log(),
            posterior_mean_coef1=betas * acp_prev.sqrt() / (1 - acp),
            posterior_mean_coef2=(1 - acp_prev) * (1 - betas).sqrt() / (1 - acp),
        )
