"""Tiled inference: tile grid coverage, exact blending, and seams on the tiny reference models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffbir.sampling.tiling import (
    cldm_tiled_denoiser,
    tile_starts,
    tile_windows,
    tiled_apply,
    tiled_denoiser,
    tiled_stage1,
    tiled_vae_decode,
    tiled_vae_encode,
)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "h, w, tile, stride, count",
    [
        (64, 64, 32, 16, 3 * 3),  # divisible
        (70, 50, 32, 16, 4 * 3),  # last tiles moved back to the border: starts 0,16,32,38 and 0,16,18
        (20, 100, 32, 32, 1 * 4),  # height below a tile: one row; width 0,32,64,68
        (10, 10, 32, 16, 1),  # smaller than a tile: one tile, the whole image
        (32, 32, 32, 8, 1),
    ],
)
def test_tile_windows_cover_the_image(h, w, tile, stride, count):
    windows = tile_windows(h, w, tile, stride)
    assert len(windows) == count == len(set(windows))
    covered = torch.zeros(h, w, dtype=torch.int64)
    for y0, y1, x0, x1 in windows:
        assert (y1 - y0, x1 - x0) == (min(tile, h), min(tile, w))
        assert 0 <= y0 and y1 <= h and 0 <= x0 and x1 <= w
        covered[y0:y1, x0:x1] += 1
    assert (covered > 0).all()
    assert max(y1 for _, y1, _, _ in windows) == h and max(x1 for _, _, _, x1 in windows) == w


@pytest.mark.parametrize("tile, stride", [(32, 0), (32, 33), (0, 1)])
def test_tile_starts_rejects_gaps(tile, stride):
    with pytest.raises(ValueError):
        tile_starts(64, tile, stride)


@pytest.mark.parametrize(
    "h, w, tile, stride, tile_batch",
    [(40, 56, 16, 8, 1), (37, 61, 16, 12, 3), (37, 61, 16, 16, 100), (9, 13, 16, 8, 2), (16, 40, 16, 5, 4)],
)
def test_pointwise_denoiser_tiled_equals_untiled(h, w, tile, stride, tile_batch):
    """A denoiser that is pointwise in x and the window's position: the blend of identical values is
    the value iff the weights sum to 1 at every pixel, borders and corners included."""
    field = randn(2, 4, h, w, seed=1)  # stands for the condition latent, cropped per window

    def tile_fn(x, t, windows):
        crops = torch.cat([field[..., y0:y1, x0:x1] for y0, y1, x0, x1 in windows])
        return torch.tanh(x) * 2 + t.view(-1, 1, 1, 1) / 1000 + crops

    x, t = randn(2, 4, h, w), torch.tensor([999, 10])
    expected = torch.tanh(x) * 2 + t.view(-1, 1, 1, 1) / 1000 + field
    out = tiled_denoiser(tile_fn, tile, stride, tile_batch)(x, t)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


class PointwiseLDM:
    """Stands for a ControlLDM: pointwise in x_t and c_img, so tiling must reproduce it exactly;
    checks the cropping of c_img, the batching of contexts and the guidance formula."""

    def __call__(self, x_t, t, c_txt, c_img, control_scale):
        return x_t * c_txt.mean((1, 2)).view(-1, 1, 1, 1) + control_scale * c_img + t.view(-1, 1, 1, 1) / 1000


def test_cldm_denoiser_crops_condition_and_guides():
    ldm, x, c_img = PointwiseLDM(), randn(2, 4, 23, 30), randn(2, 4, 23, 30, seed=1)
    c_txt, uncond = randn(2, 5, 8, seed=2) + 1, randn(1, 5, 8, seed=3)
    t = torch.tensor([500, 20])
    cond = ldm(x, t, c_txt, c_img, 0.7)
    guided = ldm(x, t, uncond.expand(2, -1, -1), c_img, 0.7)
    guided = guided + 4.0 * (cond - guided)
    for tile_batch in (1, 4):
        out = cldm_tiled_denoiser(ldm, c_txt, c_img, 8, 5, 0.7, tile_batch=tile_batch)(x, t)
        torch.testing.assert_close(out, cond, rtol=1e-6, atol=1e-6)
        out = cldm_tiled_denoiser(ldm, c_txt, c_img, 8, 5, 0.7, uncond, 4.0, tile_batch)(x, t)
        torch.testing.assert_close(out, guided, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def ramp() -> torch.Tensor:
    """A smooth RGB gradient, 256 x 384, in [0.1, 0.9]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 384), indexing="ij")
    return torch.stack([0.1 + 0.8 * xx, 0.1 + 0.8 * yy, 0.5 + 0.4 * (xx - yy)]).unsqueeze(0)


@pytest.fixture(scope="module")
def ramp_latents(tiny_bundle, ramp):
    with torch.no_grad():
        return tiny_bundle.cldm.vae_encode(ramp * 2 - 1), tiny_bundle.cldm.condition_latent(ramp)


def test_single_tile_is_the_untiled_cldm(tiny_bundle, ramp_latents):
    """Guidance and batching are checked on PointwiseLDM above; here the real model, one tile."""
    cldm, (z, c_img) = tiny_bundle.cldm, ramp_latents
    c_txt, t = randn(1, 77, 48), torch.tensor([500])
    with torch.no_grad():
        out = cldm_tiled_denoiser(cldm, c_txt, c_img, 64, 32)(z, t)
        assert torch.equal(out, cldm(z, t, c_txt, c_img))


def seam_lines(size: int, tile: int, stride: int, scale: int = 1) -> list[int]:
    """Output lines where tiles meet: tile edges and every line of an overlap (where the blend works)."""
    starts = tile_starts(size, tile, stride)
    tile = min(tile, size)
    cover = torch.zeros(size * scale, dtype=torch.int64)
    for s in starts:
        cover[s * scale : (s + tile) * scale] += 1
    edges = {e * scale for s in starts for e in (s, s + tile)} - {0, size * scale}
    return sorted(edges | set(torch.nonzero(cover > 1).flatten().tolist()))


def seam_stats(tiled, whole, size_hw, tile, stride, scale=1):
    """(max |tiled - whole| on seam lines, max step of tiled - whole across seam lines)."""
    diff = tiled - whole
    rows, cols = (seam_lines(n, tile, stride, scale) for n in size_hw)
    on_lines = [diff[..., rows, :], diff[..., cols]]
    steps = [
        diff[..., rows, :] - diff[..., [r - 1 for r in rows], :],
        diff[..., cols] - diff[..., [c - 1 for c in cols]],
    ]
    return tuple(max(d.abs().max().item() for d in ds if d.numel()) for ds in (on_lines, steps))


# The tiny reference nets have random weights and receptive fields larger than these tiles (the
# UNet and VAE attend globally, the VAE normalises with per-tile GroupNorm statistics), so a tile
# sees other context than the whole image and its output differs everywhere, not only at seams:
# `diff` bounds max |tiled - whole| on the seam lines, a regression guard. A seam proper is a
# step that tiling adds: `step` bounds the jump of tiled - whole across seam lines. Bounds are
# about 1.5x the values measured here (float32 CPU), and below what hard cuts give.
SEAMS = {
    # name: (diff bound, step bound)  measured diff, step | step of hard cuts | max |whole|
    "denoiser": (2.7, 2.0),  # 1.77, 1.38 | 3.24 (16-wide tiles, stride 16) | eps 4.1
    "vae_decode": (1.6, 0.4),  # 1.04, 0.26 | 1.03 (overlap 0) | image 6.3 (random decoder)
    "vae_encode": (0.8, 0.26),  # 0.53, 0.17 | 0.48 | latent 0.68
    "swinir": (0.13, 0.08),  # 0.088, 0.055 | 0.34 | image 0.80
}


@pytest.mark.parametrize("name", list(SEAMS))
def test_seams_on_a_smooth_ramp(name, tiny_bundle, ramp, ramp_latents):
    cldm, (z, c_img) = tiny_bundle.cldm, ramp_latents
    with torch.no_grad():
        if name == "denoiser":
            c_txt, t = randn(1, 77, 48), torch.tensor([500])
            whole = cldm(z, t, c_txt, c_img)
            tiled = cldm_tiled_denoiser(cldm, c_txt, c_img, 24, 12, tile_batch=6)(z, t)
            stats = seam_stats(tiled, whole, z.shape[-2:], 24, 12)
        elif name == "vae_decode":
            whole, tiled = cldm.vae_decode(z), tiled_vae_decode(cldm, z, 32, 16, tile_batch=4)
            stats = seam_stats(tiled, whole, z.shape[-2:], 32, 16, scale=8)
        elif name == "vae_encode":
            tiled = tiled_vae_encode(cldm, ramp * 2 - 1, 128, 64, tile_batch=8)
            stats = seam_stats(tiled, z, z.shape[-2:], 16, 8)
        else:
            whole, tiled = tiny_bundle.stage1(ramp), tiled_stage1(tiny_bundle.stage1, ramp, 128, 64, tile_batch=8)
            stats = seam_stats(tiled, whole, ramp.shape[-2:], 128, 64)
    diff_bound, step_bound = SEAMS[name]
    assert stats[0] < diff_bound and stats[1] < step_bound, f"{name}: seam diff/step {stats} over {SEAMS[name]}"


class Upsample4(nn.Module):
    """A pointwise x4 net that, like SwinIR, only takes sides that are multiples of 64."""

    def forward(self, x):
        assert x.shape[-2] % 64 == 0 and x.shape[-1] % 64 == 0, x.shape
        return F.interpolate(torch.sigmoid(x) * 2 - 0.5, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("h, w, tile, overlap", [(150, 260, 100, 20), (40, 50, 128, 32), (128, 200, 64, 0)])
def test_tiled_stage1_scale4_equals_untiled(h, w, tile, overlap):
    image = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    out = tiled_stage1(Upsample4(), image, tile, overlap, scale=4, multiple=64, tile_batch=3)
    assert out.shape == (2, 3, 4 * h, 4 * w)
    expected = F.interpolate(torch.sigmoid(image) * 2 - 0.5, scale_factor=4, mode="nearest")
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        tiled_stage1(Upsample4(), image, tile, overlap, scale=2)


def test_tiled_downscale_by_8_equals_untiled():
    """The VAE-encode geometry (scale 1/8): 8x8 mean pooling is local, so tiles reproduce it."""
    image = randn(1, 3, 200, 136)
    out = tiled_apply(lambda x: F.avg_pool2d(x, 8), image, 64, 16, scale=1 / 8, tile_batch=2)
    torch.testing.assert_close(out, F.avg_pool2d(image, 8), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="whole number"):
        tiled_apply(lambda x: F.avg_pool2d(x, 8), image[..., :-4], 64, 16, scale=1 / 8)
