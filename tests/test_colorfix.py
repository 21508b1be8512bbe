"""Wavelet colour fix: fixture g plus properties that a wrong kernel / dilation / padding breaks."""

from __future__ import annotations

import pytest
import torch

from diffbir.colorfix import wavelet_blur, wavelet_decomposition, wavelet_reconstruction

from conftest import SINGLE_EVAL, assert_close_golden, load_fixture


def test_fixture_g(golden):
    g = load_fixture(golden, "g_wavelet")
    high, low = wavelet_decomposition(g["content"])
    assert_close_golden(high, g["content_high_freq"], **SINGLE_EVAL, name="content_high_freq")
    assert_close_golden(low, g["content_low_freq"], **SINGLE_EVAL, name="content_low_freq")
    assert_close_golden(wavelet_reconstruction(g["content"], g["style"]), g["output"], **SINGLE_EVAL, name="output")


@pytest.mark.parametrize("radius", [1, 2, 4, 8, 16])
def test_blur_impulse_response(radius):
    """A centred delta comes out as the binomial kernel at taps ±radius; a constant stays constant."""
    size = 4 * radius + 9
    c = size // 2
    img = torch.zeros(1, 3, size, size, dtype=torch.float64)
    img[:, :, c, c] = 16.0
    expected = torch.zeros_like(img)
    for dy, wy in ((-radius, 1), (0, 2), (radius, 1)):
        for dx, wx in ((-radius, 1), (0, 2), (radius, 1)):
            expected[:, :, c + dy, c + dx] = wy * wx
    torch.testing.assert_close(wavelet_blur(img, radius), expected, rtol=0, atol=1e-12)
    flat = torch.full((2, 3, 7, 5), 0.3, dtype=torch.float64)  # replicate padding: no border darkening
    torch.testing.assert_close(wavelet_blur(flat, radius), flat, rtol=0, atol=1e-12)


def test_replicate_padding_at_border():
    """Left border of a horizontal ramp: the out-of-image tap repeats the edge pixel."""
    img = torch.arange(6, dtype=torch.float64).expand(1, 3, 6, 6).contiguous()
    out = wavelet_blur(img, 1)
    torch.testing.assert_close(out[..., 0], torch.full_like(out[..., 0], (0 + 2 * 0 + 1) / 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decomposition_properties(dtype):
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(2, 3, 40, 56, generator=gen, dtype=dtype)
    style = torch.rand(2, 3, 40, 56, generator=gen, dtype=dtype)
    tol = dict(rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    high, low = wavelet_decomposition(content)
    torch.testing.assert_close(high + low, content, **tol)  # telescoping sum
    torch.testing.assert_close(wavelet_reconstruction(content, content), content, **tol)
    out = wavelet_reconstruction(content, style)
    torch.testing.assert_close(out, high + wavelet_decomposition(style)[1], **tol)
    # per sample and per channel: batch element 1 alone gives the same result
    torch.testing.assert_close(wavelet_reconstruction(content[1:], style[1:]), out[1:], **tol)
    # low frequencies are smooth: far less variation than the input
    assert low.diff(dim=-1).abs().mean() < 0.1 * content.diff(dim=-1).abs().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(golden, dtype):
    g = load_fixture(golden, "g_wavelet")
    out = wavelet_reconstruction(g["content"].to(dtype), g["style"].to(dtype))
    assert out.dtype == dtype
    err = (out.double() - g["output"].double()).abs().max().item()
    assert err < 0.05 * g["output"].abs().max().item()
