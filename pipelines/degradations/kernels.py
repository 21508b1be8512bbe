"""Blur kernels: BasicSR's bivariate family (Gaussian, generalized Gaussian, plateau) and the
circular sinc (Real-ESRGAN, eq. 2-4), as normalised float64 arrays.

A kernel is described by a JSON-able spec, e.g. ``{"type": "aniso", "size": 21, "sigma_x": 2.0,
"sigma_y": 0.5, "theta": 0.3}``: the ``sample_*`` functions draw one, ``make_kernel`` builds it.
Coordinates: x is the column offset, y the row offset from the centre, theta in radians.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal, get_args

import numpy as np
from scipy import special

KernelType = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
KERNEL_TYPES: tuple[str, ...] = get_args(KernelType)


@lru_cache(maxsize=32)
def _grid(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {ksize}")
    ax = np.arange(ksize, dtype=np.float64) - ksize // 2
    xx, yy = np.meshgrid(ax, ax)
    xx.flags.writeable = yy.flags.writeable = False  # shared by the cache
    return xx, yy


def _quadratic_form(ksize: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on the kernel grid, Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T."""
    xx, yy = _grid(ksize)
    c, s = math.cos(theta), math.sin(theta)
    # coordinates in the kernel's principal axes: R^T x
    u = c * xx + s * yy
    v = c * yy - s * xx
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(ksize: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> np.ndarray:
    """Bivariate Gaussian exp(-1/2 x^T Sigma^-1 x); isotropic when sigma_x == sigma_y."""
    k = np.exp(-0.5 * _quadratic_form(ksize, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_kernel(ksize: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Generalized Gaussian exp(-1/2 (x^T Sigma^-1 x)^beta).

    beta = 1 is the Gaussian (BasicSR's parameterisation, which Real-ESRGAN's betag_range [0.5, 4]
    refers to); beta < 1 gives heavier tails, beta > 1 a flatter top.
    """
    k = np.exp(-0.5 * _quadratic_form(ksize, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def plateau_kernel(ksize: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Plateau-shaped 1 / (1 + (x^T Sigma^-1 x)^beta): flat top, polynomial tails."""
    k = 1.0 / (1.0 + _quadratic_form(ksize, sigma_x, sigma_y, theta) ** beta)
    return k / k.sum()


def sinc_kernel(ksize: int, cutoff: float) -> np.ndarray:
    """Circularly symmetric ideal low-pass filter (2-D sinc), cutoff in radians (pi = Nyquist).

    The continuous response cutoff * J1(cutoff * r) / (2 pi r), sampled and normalised; its
    truncation to ksize x ksize is what produces Real-ESRGAN's ringing and overshoot artefacts.
    """
    xx, yy = _grid(ksize)
    r = np.hypot(xx, yy)
    r[ksize // 2, ksize // 2] = 1.0  # placeholder: the centre takes the limit r -> 0 below
    k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[ksize // 2, ksize // 2] = cutoff**2 / (4 * np.pi)
    return k / k.sum()


def make_kernel(spec: dict) -> np.ndarray:
    """Build the kernel a spec describes (see the module docstring)."""
    kind, ksize = spec["type"], spec["size"]
    if kind == "sinc":
        return sinc_kernel(ksize, spec["cutoff"])
    shape = (ksize, spec["sigma_x"], spec["sigma_y"], spec["theta"])
    if kind in ("iso", "aniso"):
        return gaussian_kernel(*shape)
    if kind.startswith("generalized_"):
        return generalized_kernel(*shape, spec["beta"])
    if kind.startswith("plateau_"):
        return plateau_kernel(*shape, spec["beta"])
    raise ValueError(f"unknown kernel type {kind!r}")


def _sample_beta(rng: np.random.Generator, low: float, high: float) -> float:
    # BasicSR: half of the draws below 1 (heavier tails / sharper plateau), half above; with
    # low = 1 (betap_range [1, 2]) the lower half is exactly 1, as in the reference.
    split = min(max(1.0, low), high)
    return float(rng.uniform(low, split) if rng.random() < 0.5 else rng.uniform(split, high))


def sample_mixed_kernel(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    ksize: int,
    sigma_range: Sequence[float],
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
) -> dict:
    """Draw a kernel spec from BasicSR's mixture (its random_mixed_kernels, without kernel noise).

    Isotropic types use sigma_y = sigma_x and theta = 0; anisotropic ones draw sigma_y and theta too.
    """
    p = np.asarray(kernel_prob, dtype=np.float64)
    kind = kernel_list[int(rng.choice(len(kernel_list), p=p / p.sum()))]
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    sigma_x = float(rng.uniform(*sigma_range))
    if kind.endswith("aniso"):
        sigma_y, theta = float(rng.uniform(*sigma_range)), float(rng.uniform(*rotation_range))
    else:
        sigma_y, theta = sigma_x, 0.0
    spec = {"type": kind, "size": int(ksize), "sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized_"):
        spec["beta"] = _sample_beta(rng, *betag_range)
    elif kind.startswith("plateau_"):
        spec["beta"] = _sample_beta(rng, *betap_range)
    return spec


def sample_sinc_kernel(rng: np.random.Generator, ksize: int, cutoff_range: Sequence[float]) -> dict:
    """Draw a sinc kernel spec with a cut-off uniform in cutoff_range (radians)."""
    return {"type": "sinc", "size": int(ksize), "cutoff": float(rng.uniform(*cutoff_range))}
