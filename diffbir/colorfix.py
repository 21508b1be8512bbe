"""Wavelet colour fix (golden README §6, fixture g): keep the high frequencies of the diffusion
output and take the low frequencies (colour, tone) from the stage-1 restoration."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_KERNEL = [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """3x3 binomial blur per channel (depthwise), dilated by `radius`, replicate padding."""
    channels = image.shape[1]
    kernel = (torch.tensor(_KERNEL, dtype=image.dtype, device=image.device) / 16).expand(channels, 1, 3, 3)
    image = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(image, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): high = sum over levels of (img_l - blur(img_l, 2**l)), low = the last blur."""
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, low


def wavelet_reconstruction(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """High frequencies of `content` plus low frequencies of `style` (same shape)."""
    return wavelet_decomposition(content)[0] + wavelet_decomposition(style)[1]
