"""The official DiffBIR v2.1 sampling path (reference HEAD `diffbir/sampler/edm_sampler.py`, golden
README §5 i): k-diffusion's solvers on the reference's own sigma schedule, over the same `Denoiser`.

* Schedule for N steps: the training timesteps floor(linspace(T-1, 0, N, endpoint=False)), their
  alpha_bar with the first replaced by 1e-8, sigma = sqrt((1 - ab) / ab) (so sigma_max = 1e4 for
  every schedule, zero terminal SNR included), stored as float32; then sigma 0 at timestep 0.
* Start: x = x_T * sqrt(1 + sigma_0^2) (the variance-exploding state of k-diffusion).
* D(x, sigma) = c_skip x + c_out F(c_in x, t): eps c_skip = 1, c_out = -sigma; v c_skip =
  1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1); c_in = 1 / sqrt(sigma^2 + 1). The network
  sees the timestep of the nearest schedule sigma (the appended 0 included) - not the timestep
  whose training sigma is `sigma`, which is why these samplers are not the Karras ones. The path is
  v2.1's: at zero terminal SNR sigma_0 = 1e4 stands for the infinite sigma of t = T; eps weights
  (v1, v2) read at sigma_0 give latents of ~1e4 (fixture i's eps cases, as the reference does).
* Solvers: k-diffusion's sample_* with the reference's hyper-parameters. Every random draw goes
  through the `noise` function in call order, the Brownian-tree draws of the SDE solvers included
  (independent normals by default: each Brownian increment is one; the tree only correlates the two
  draws of a dpm++_sde step). Euler, Heun and DPM-2 draw at every step whether or not they churn.

diffusers has none of this: its EDM schedulers use Karras sigmas and the training timestep of each
sigma. Scalars are float64 Python numbers; the state stays in the dtype of x_T (float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.polynomial import Polynomial

from diffbir.sampling.denoiser import Denoiser, NoiseFn, StateGuidance, Step, X0Hook, x0_coef
from diffbir.sampling.schedules import NoiseSchedule

Callback = Callable[[int, torch.Tensor], None]
Denoised = Callable[[torch.Tensor, float, int], torch.Tensor]  # (x, sigma, step index) -> x0
MAX_CHURN = math.sqrt(2) - 1


@dataclass(frozen=True)
class EDMOptions:
    """The solvers' hyper-parameters, with the official inference defaults. Each solver reads only
    its own: churn (s_churn, s_tmin, s_tmax, s_noise) for euler, heun, dpm_2; eta and s_noise for
    the ancestral and SDE solvers; order for lms."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 300.0
    s_noise: float = 1.0
    eta: float = 1.0
    order: int = 1


@dataclass(frozen=True)
class EDMSchedule:
    sigmas: tuple[float, ...]  # float32 values, descending, ending in 0
    timesteps: tuple[int, ...]  # the network's timestep for each sigma (0 for the final 0)

    @classmethod
    def create(cls, schedule: NoiseSchedule, steps: int) -> EDMSchedule:
        n = schedule.num_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"cannot take {steps} steps out of {n}")
        timesteps = np.linspace(n - 1, 0, steps, endpoint=False).astype(int)  # numpy, as the reference rounds
        ab = schedule.alphas_cumprod.numpy()[timesteps]
        ab[0] = 1e-8
        sigmas = np.append(np.sqrt((1 - ab) / ab), 0).astype(np.float32)
        return cls(tuple(sigmas.tolist()), (*timesteps.tolist(), 0))

    def timestep(self, sigma: float) -> int:
        """The timestep of the schedule sigma nearest to `sigma` (the first of equals)."""
        return self.timesteps[min(range(len(self.sigmas)), key=lambda k: abs(sigma - self.sigmas[k]))]


def edm_denoiser(
    den: Denoiser,
    sigmas: list[float],
    timestep: Callable[[float], float],
    guidance: StateGuidance | None = None,
    x0_use: tuple[float, int] = (0.0, 1),
) -> Denoised:
    """The reference's D(x, sigma) on the schedule `sigmas`; the network sees `timestep(sigma)`.
    `guidance` observes each x0 with its step's x0_coef and a share of 1 / evaluations; x0_use =
    (eta, model evaluations per step) of the solver (a step into sigma 0 evaluates once)."""
    eps = den.config.parameterization == "eps"
    eta, evaluations = x0_use

    def denoised(x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
        t = timestep(sigma)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        out = den(x * c_in, t)
        x0 = x - sigma * out if eps else x * c_in**2 - (sigma * c_in) * out
        if guidance is not None:
            ab, ab_next = (1 / (1 + v**2) for v in sigmas[i : i + 2])
            step = Step(float(t), 1 / (1 + sigma**2), x0_coef(ab, ab_next, eta))
            guidance.observe(x0, step, 1 / (evaluations if sigmas[i + 1] > 0 else 1))
        return x0

    return denoised


class _Draws:
    """The noise function with its call counter: every solver draws through one of these."""

    def __init__(self, noise: NoiseFn):
        self.noise, self.count = noise, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.noise(like, self.count - 1)


def _t(sigma: float) -> float:  # k-diffusion's t_fn = -log(sigma), +inf at sigma 0
    return -math.log(sigma) if sigma > 0 else math.inf


def _ancestral(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion get_ancestral_step)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _churn(x: torch.Tensor, s: list[float], i: int, draw: _Draws, o: EDMOptions) -> tuple[torch.Tensor, float]:
    """Karras' stochastic churn: raise sigma_i to sigma_hat with fresh noise (drawn even when unused)."""
    gamma = min(o.s_churn / (len(s) - 1), MAX_CHURN) if o.s_tmin <= s[i] <= o.s_tmax else 0.0
    eps = draw(x) * o.s_noise
    sigma_hat = s[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * math.sqrt(sigma_hat**2 - s[i] ** 2)
    return x, sigma_hat


# The solvers: solver(x, s, D, draw, done, o) -> z_0, each k-diffusion's sample_<name> step for step
# (the same updates, evaluations and draws in the same order). x: the state at sigma s[0]; s: the
# sigmas, ending in 0; D: edm_denoiser; draw: the run's _Draws; x = done(i, x) after step i (guidance's
# state shift, the callback); o: EDMOptions.
Solver = Callable[[torch.Tensor, list[float], Denoised, _Draws, Callback, EDMOptions], torch.Tensor]


def euler(x, s, D, draw, done, o):
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, draw, o)
        d = (x - D(x, sigma_hat, i)) / sigma_hat
        x = x + d * (s[i + 1] - sigma_hat)
        x = done(i, x)
    return x


def heun(x, s, D, draw, done, o):
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, draw, o)
        d = (x - D(x, sigma_hat, i)) / sigma_hat
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - D(x_2, s[i + 1], i)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
        x = done(i, x)
    return x


def dpm_2(x, s, D, draw, done, o):
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s, i, draw, o)
        d = (x - D(x, sigma_hat, i)) / sigma_hat
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            mid = math.sqrt(sigma_hat * s[i + 1])  # the midpoint in log sigma
            x_2 = x + d * (mid - sigma_hat)
            d_2 = (x_2 - D(x_2, mid, i)) / mid
            x = x + d_2 * (s[i + 1] - sigma_hat)
        x = done(i, x)
    return x


def euler_a(x, s, D, draw, done, o):
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        down, up = _ancestral(s[i], s[i + 1], o.eta)
        x = x + (x - x0) / s[i] * (down - s[i])
        if s[i + 1] > 0:
            x = x + draw(x) * o.s_noise * up
        x = done(i, x)
    return x


def dpm_2_a(x, s, D, draw, done, o):
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        down, up = _ancestral(s[i], s[i + 1], o.eta)
        d = (x - x0) / s[i]
        if down == 0:
            x = x + d * (down - s[i])
        else:
            mid = math.sqrt(s[i] * down)
            x_2 = x + d * (mid - s[i])
            d_2 = (x_2 - D(x_2, mid, i)) / mid
            x = x + d_2 * (down - s[i]) + draw(x) * o.s_noise * up
        x = done(i, x)
    return x


def _lms_coefficient(t: list[float], i: int, j: int, order: int) -> float:
    """The integral over [t_i, t_i+1] of the Lagrange basis polynomial of t_(i-j) on t_i, ..., t_(i-order+1),
    exactly (the reference integrates numerically to 1e-4)."""
    p = Polynomial([1.0])
    for k in range(order):
        if k != j:
            p = p * Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    q = p.integ()
    return float(q(t[i + 1]) - q(t[i]))


def lms(x, s, D, draw, done, o):
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        ds = [*ds, (x - D(x, s[i], i)) / s[i]][-o.order :]
        order = min(i + 1, o.order)
        coefficients = [_lms_coefficient(s, i, j, order) for j in range(order)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(ds)))
        x = done(i, x)
    return x


def dpmpp_2s_a(x, s, D, draw, done, o):
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        down, up = _ancestral(s[i], s[i + 1], o.eta)
        if down == 0:
            x = x + (x - x0) / s[i] * (down - s[i])
        else:
            h = _t(down) - _t(s[i])
            mid = math.sqrt(s[i] * down)
            x_2 = (mid / s[i]) * x - math.expm1(-h / 2) * x0
            x = (down / s[i]) * x - math.expm1(-h) * D(x_2, mid, i)
        if s[i + 1] > 0:
            x = x + draw(x) * o.s_noise * up
        x = done(i, x)
    return x


def dpmpp_sde(x, s, D, draw, done, o):
    """DPM-Solver++ (stochastic), r = 1/2: two Brownian draws per step (sigma_i -> mid, sigma_i -> sigma_i+1)."""
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        if s[i + 1] == 0:
            x = x + (x - x0) / s[i] * (s[i + 1] - s[i])
        else:
            t = _t(s[i])
            mid = math.exp(-(t + (_t(s[i + 1]) - t) / 2))
            down, up = _ancestral(s[i], mid, o.eta)
            x_2 = (down / s[i]) * x - math.expm1(t - _t(down)) * x0
            x_2 = x_2 + draw(x) * o.s_noise * up
            x0_2 = D(x_2, mid, i)
            down, up = _ancestral(s[i], s[i + 1], o.eta)
            x = (down / s[i]) * x - math.expm1(t - _t(down)) * x0_2  # fac = 1: only the midpoint estimate
            x = x + draw(x) * o.s_noise * up
        x = done(i, x)
    return x


def dpmpp_2m(x, s, D, draw, done, o):
    x0_1 = None
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        if s[i + 1] == 0:
            x = x0
        else:
            h = _t(s[i + 1]) - _t(s[i])
            if x0_1 is not None:
                r = (_t(s[i]) - _t(s[i - 1])) / h
                x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_1
            else:
                x0_d = x0
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * x0_d
        x0_1 = x0
        x = done(i, x)
    return x


def dpmpp_2m_sde(x, s, D, draw, done, o):
    """DPM-Solver++(2M) SDE, midpoint variant (k-diffusion's default)."""
    x0_1 = h_1 = None
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        if s[i + 1] == 0:
            x = x0
        else:
            h = _t(s[i + 1]) - _t(s[i])
            eta_h = o.eta * h
            x = s[i + 1] / s[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * x0
            if x0_1 is not None:
                x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_1) * (x0 - x0_1)
            if o.eta:
                x = x + draw(x) * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * o.s_noise
            h_1 = h
        x0_1 = x0
        x = done(i, x)
    return x


def dpmpp_3m_sde(x, s, D, draw, done, o):
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(len(s) - 1):
        x0 = D(x, s[i], i)
        if s[i + 1] == 0:
            x = x0
        else:
            h = _t(s[i + 1]) - _t(s[i])
            h_eta = h * (o.eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * x0
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:  # third order from the last two estimates
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (x0 - x0_1) / (h_1 / h)
            if o.eta:
                x = x + draw(x) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * o.eta)) * o.s_noise
            h_1, h_2 = h, h_1
        x0_1, x0_2 = x0, x0_1
        x = done(i, x)
    return x


EDM_SOLVERS: dict[str, Solver] = {
    "edm_euler": euler,
    "edm_euler_a": euler_a,
    "edm_heun": heun,
    "edm_dpm_2": dpm_2,
    "edm_dpm_2_a": dpm_2_a,
    "edm_lms": lms,
    "edm_dpm++_2s_a": dpmpp_2s_a,
    "edm_dpm++_sde": dpmpp_sde,
    "edm_dpm++_2m": dpmpp_2m,
    "edm_dpm++_2m_sde": dpmpp_2m_sde,
    "edm_dpm++_3m_sde": dpmpp_3m_sde,
}
# How a solver uses each evaluation's x0, for guidance calibration: (adds fresh noise - then its
# eta sets the step's x0 weight, else the ODE's -, model evaluations per step). Churn is ignored.
_X0_USE: dict[str, tuple[bool, int]] = {
    "edm_euler": (False, 1),
    "edm_euler_a": (True, 1),
    "edm_heun": (False, 2),
    "edm_dpm_2": (False, 2),
    "edm_dpm_2_a": (True, 2),
    "edm_lms": (False, 1),
    "edm_dpm++_2s_a": (True, 2),
    "edm_dpm++_sde": (True, 2),
    "edm_dpm++_2m": (False, 1),
    "edm_dpm++_2m_sde": (True, 1),
    "edm_dpm++_3m_sde": (True, 1),
}
EDM_SAMPLERS = tuple(EDM_SOLVERS)


@torch.no_grad()
def sample_edm(
    den: Denoiser,
    x_T: torch.Tensor,
    sampler: str,
    steps: int,
    *,
    options: EDMOptions | None = None,
    x0_hook: X0Hook | None = None,
    noise: NoiseFn,
    callback: Callback | None = None,
) -> torch.Tensor:
    """z_0 from x_T (the variance-preserving latent at the last training timestep) with `steps`
    steps of the EDM solver `sampler` (one of EDM_SAMPLERS) on the reference's schedule;
    `callback(i, x)` gets the variance-exploding state after step i (the last one is z_0)."""
    schedule = EDMSchedule.create(den.schedule, steps)
    return sample_sigmas(den, x_T, sampler, list(schedule.sigmas), schedule.timestep, options, x0_hook, noise, callback)


def sample_sigmas(
    den: Denoiser,
    x_T: torch.Tensor,
    sampler: str,
    sigmas: list[float],
    timestep: Callable[[float], float],
    options: EDMOptions | None,
    x0_hook: X0Hook | None,
    noise: NoiseFn,
    callback: Callback | None,
) -> torch.Tensor:
    """Run the solver `sampler` over `sigmas` (descending, ending in 0) from the VP latent x_T; the
    network sees timestep(sigma). The EDM path and the Karras-sigma samplers both run here."""
    o = options or EDMOptions()
    noisy, evaluations = _X0_USE[sampler]
    guidance = StateGuidance(x0_hook) if x0_hook is not None else None

    def done(i: int, x: torch.Tensor) -> torch.Tensor:
        if guidance is not None:
            x = guidance.apply(x, math.sqrt(1 + sigmas[i + 1] ** 2))  # VP to the variance-exploding state
        if callback is not None:
            callback(i, x)
        return x

    return EDM_SOLVERS[sampler](
        x_T * math.sqrt(1 + sigmas[0] ** 2),
        sigmas,
        edm_denoiser(den, sigmas, timestep, guidance, (o.eta if noisy else 0.0, evaluations)),
        _Draws(noise),
        done,
        o,
    )
