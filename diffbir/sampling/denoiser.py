"""The one interface every sampler runs on: a `Denoiser` gives the network's raw prediction (eps
or v, classifier-free guidance applied) for a latent x_t at a training timestep t, and converts
between that prediction and the predicted clean latent x0 under the training schedule.

Latents are "variance preserving": x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from diffbir.config import DiffusionConfig
from diffbir.sampling.schedules import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> eps | v


class NoiseFn(Protocol):
    """Standard normal noise shaped like `like`, for the sampler's `index`-th draw (call order)."""

    def __call__(self, like: torch.Tensor, index: int) -> torch.Tensor: ...


def gaussian_noise(generator: torch.Generator | None = None) -> NoiseFn:
    """Fresh N(0, I) draws from `generator`, on the generator's device first so that a CPU
    generator gives the same numbers whatever device the latents live on."""

    def draw(like: torch.Tensor, index: int) -> torch.Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)

    return draw


def stored_noise(tensors: Sequence[torch.Tensor]) -> NoiseFn:
    """Replay given tensors in call order (e.g. the reference's recorded randn_like draws)."""
    return lambda like, index: tensors[index].to(like)


@dataclass(frozen=True)
class Step:
    """What an x0 hook learns about the model evaluation whose x0 it may change."""

    t: float  # the training timestep the network saw
    alpha_bar: float  # noise level of this evaluation
    x0_coef: float  # how far the sampler's next state moves per unit change of this x0 (see x0_coef)


def x0_coef(alpha_bar: float, alpha_bar_next: float, eta: float = 1.0) -> float:
    """How far a sampler's next (variance-preserving) state moves per unit change of x0 in its step
    from noise level alpha_bar to alpha_bar_next, at first order.

    A first-order step in sigma space is x_next = r x + (1 - r) x0 with r = (sigma_next / sigma)^(1 + eta):
    eta 0 for the probability-flow ODE (DDIM, Euler, Heun, DPM-Solver++ 2M, LMS), eta 1 for DDPM and
    the ancestral and SDE solvers at full noise - where this is exactly the DDPM posterior-mean weight
    of x0 (the spaced schedule's posterior_mean_coef1). In VP units it is divided by sqrt(1 + sigma_next^2)."""
    if alpha_bar_next >= 1:  # the last step lands on x0 itself
        return 1.0
    ratio2 = (1 - alpha_bar_next) * alpha_bar / ((1 - alpha_bar) * alpha_bar_next)  # (sigma_next / sigma)^2
    return (1 - ratio2 ** ((1 + eta) / 2)) * math.sqrt(alpha_bar_next)


X0Hook = Callable[[torch.Tensor, Step], torch.Tensor]


class StateGuidance:
    """An x0 hook applied as a shift of the sampler's state after its step: each evaluation's
    x0_coef * (hook(x0) - x0) * share (VP units), while the sampler itself goes on with the network's
    own x0. To first order this is what a first-order sampler does with the hook's x0; unlike it, the
    multistep solvers (DPM-Solver++ 2M/3M, LMS) keep the network's x0 in their history - the hook's
    change entering their difference terms would be amplified in one step and undone in the next - and
    a step with k evaluations (Heun, DPM-2) gives each the share 1/k. So every sampler moves its next
    state by what the hook asked for, once per step (the calibration rule of RestorationGuidance)."""

    def __init__(self, hook: X0Hook):
        self.hook = hook
        self.pending: torch.Tensor | None = None

    def observe(self, x0: torch.Tensor, step: Step, share: float = 1.0) -> None:
        shift = (self.hook(x0, step) - x0) * (step.x0_coef * share)
        self.pending = shift if self.pending is None else self.pending + shift

    def apply(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The state after a step plus the pending shift, `scale` state units per VP unit."""
        if self.pending is None:
            return x
        x, self.pending = x + self.pending * scale, None
        return x


def rescaled_cfg_scale(cfg_scale: float, t: float) -> float:
    """The reference's rescale_cfg: the scale grows from 1 at t = 1000 to 1 + cfg_scale at t = 0,
    1 + s (1 - cos(pi ((1000 - t) / 1000)^5)) / 2 (1000 hard-coded there too); unchanged for s <= 1."""
    if cfg_scale <= 1:
        return cfg_scale
    return 1 + cfg_scale * (1 - math.cos(math.pi * ((1000 - t) / 1000) ** 5)) / 2


def cfg_model(
    cldm,
    c_img: torch.Tensor,
    c_txt: torch.Tensor,
    c_txt_neg: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    control_scale: float | Sequence[float] = 1.0,
    rescale_cfg: bool = False,
) -> ModelFn:
    """ControlLDM with classifier-free guidance: uncond + cfg * (cond - uncond), the positive
    prompt evaluated first (as the reference); one call only when cfg_scale == 1. `rescale_cfg`:
    the scale at timestep t is rescaled_cfg_scale(cfg_scale, t). The network runs in its own dtype;
    its outputs come back in x_t's (the sampler state: float32), where the guidance arithmetic is done."""
    if cfg_scale != 1.0 and c_txt_neg is None:
        raise ValueError("classifier-free guidance needs a negative prompt context")

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = cldm(x_t, t, c_txt, c_img, control_scale).to(x_t.dtype)
        if cfg_scale == 1.0:
            return cond
        uncond = cldm(x_t, t, c_txt_neg, c_img, control_scale).to(x_t.dtype)
        scale = rescaled_cfg_scale(cfg_scale, t.reshape(-1)[0].item()) if rescale_cfg else cfg_scale
        return uncond + scale * (cond - uncond)

    return model


class Denoiser:
    """A network prediction function paired with the schedule and parameterization it was trained with."""

    def __init__(self, model: ModelFn, config: DiffusionConfig):
        self.model, self.config = model, config
        self.schedule = NoiseSchedule.from_config(config)

    def __call__(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        return self.model(x_t, torch.as_tensor(t, dtype=torch.float32))

    def _coefs(self, t) -> tuple[float, float]:
        # (sqrt(1/ab), sqrt(1/ab - 1)) for eps, (sqrt(ab), sqrt(1 - ab)) for v: the reference's
        # buffers, computed in float64 and applied as scalars of the latent's dtype
        ab = self.schedule.alpha_bar(t)
        a, b = (
            ((1 / ab).sqrt(), (1 / ab - 1).sqrt())
            if self.config.parameterization == "eps"
            else (ab.sqrt(), (1 - ab).sqrt())
        )
        return a.item(), b.item()

    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        a, b = self._coefs(t)
        return a * x_t - b * out  # eps: x_t/sqrt(ab) - sqrt(1/ab-1) eps;  v: sqrt(ab) x_t - sqrt(1-ab) v

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        a, b = self._coefs(t)
        return (a * x_t - x0) / b

    def x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        return self.to_x0(self(x_t, t), x_t, t)


def initial_latent(den: Denoiser, noise: torch.Tensor, c_img: torch.Tensor | None = None) -> torch.Tensor:
    """x_T at the last training timestep, where every sampler starts: pure noise, or the condition
    latent diffused to T (sqrt(ab_T) c_img + sqrt(1 - ab_T) noise; = noise at zero terminal SNR)."""
    if c_img is None:
        return noise
    ab = den.schedule.alphas_cumprod[-1].item()
    return ab**0.5 * c_img + (1 - ab) ** 0.5 * noise
