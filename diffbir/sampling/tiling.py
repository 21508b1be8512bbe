"""Tiled inference with bounded memory: the latent denoiser (MultiDiffusion-style, as DiffBIR's
tiled sampler), the VAE and stage-1 nets, each run over overlapping tiles and blended.

Tiles form a grid (every row of tiles has the same column starts), so the blend weights are
separable: per-axis weights normalised per axis give 2-D weights that sum to 1 at every pixel,
without a full-size weight or count map. The only full-size tensors are the input and the output.

Tile sizes are in pixels of the function's input: latent pixels for the denoiser and VAE decode,
image pixels for VAE encode and stage 1.

diffusers' AutoencoderKL tiling (`enable_tiling`, `tiled_encode/decode`) is not used: it keeps every
decoded tile until the end and concatenates rows (about 2.8x the full-size output on top of it),
its tile sizes are attributes of the shared module (`tile_sample_min_size`, `tile_latent_min_size`,
set per call = not safe with concurrent requests on one model), and its fixed 1/4 overlap cannot
be tuned per call. Like it, tiles here normalise with per-tile GroupNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from diffbir.models.cldm import ControlLDM
from diffbir.sampling.denoiser import ModelFn, cfg_model

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1) of a tile, ends exclusive
# (x tiles [k*N, C, th, tw], t [k*N], the k windows) -> prediction; rows are tile-major:
# tile 0's N images, then tile 1's, ...
TileDenoiser = Callable[[torch.Tensor, torch.Tensor, Sequence[Window]], torch.Tensor]


def tile_starts(size: int, tile_size: int, stride: int) -> list[int]:
    """Start offsets along one axis: every `stride`, the last tile flush with the end. A tile is
    min(tile_size, size) long, so a side smaller than a tile gets one tile covering it."""
    if tile_size < 1 or not 0 < stride <= tile_size:
        raise ValueError(f"need tile_size >= 1 and 0 < stride <= tile_size, got {tile_size}, {stride}")
    last = size - min(tile_size, size)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def tile_windows(h: int, w: int, tile_size: int, stride: int) -> list[Window]:
    """The tile grid over an h x w image, row by row."""
    th, tw = min(tile_size, h), min(tile_size, w)
    xs = tile_starts(w, tile_size, stride)
    return [(y, y + th, x, x + tw) for y in tile_starts(h, tile_size, stride) for x in xs]


def gaussian_profile(n: int) -> torch.Tensor:
    """DiffBIR's `gaussian_weights` along one axis (variance 0.01 * n^2, i.e. sigma = n / 10)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-0.5 * ((i - (n - 1) / 2) / (0.1 * n)) ** 2)


def feather_profile(n: int, ramp: int) -> torch.Tensor:
    """Linear ramps of `ramp` pixels at both ends; two tiles overlapping by `ramp` sum to 1 there."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(ramp + 1.0)) / (ramp + 1)


def _axis_weights(size: int, tile: int, starts: list[int], profile: torch.Tensor) -> list[torch.Tensor]:
    """Per-tile weights along one axis, normalised so the tiles covering each index sum to 1."""
    norm = torch.zeros(size, dtype=torch.float64)
    for s in starts:
        norm[s : s + tile] += profile
    return [profile / norm[s : s + tile] for s in starts]


def _scaled(v: int, scale: float) -> int:
    out = v * scale
    if out != int(out):
        raise ValueError(f"{v} pixels at scale {scale} is not a whole number of output pixels")
    return int(out)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    ph, pw = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if not ph and not pw:
        return x
    # reflect needs the pad shorter than the side; tiny images fall back to replicate
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _blend_tiles(
    fn: Callable[[torch.Tensor, Sequence[Window]], torch.Tensor],
    x: torch.Tensor,
    tile_size: int,
    stride: int,
    profile: Callable[[int], torch.Tensor],
    scale: float = 1,
    multiple: int = 1,
    tile_batch: int = 1,
) -> torch.Tensor:
    """Run `fn` over the tile grid of `x` (tile_batch tiles per call, each padded to `multiple`)
    and blend its outputs, `scale` times the input size, with `profile` weights."""
    n, _, h, w = x.shape
    ys, xs = tile_starts(h, tile_size, stride), tile_starts(w, tile_size, stride)
    th, tw = min(tile_size, h), min(tile_size, w)
    oh, ow, oth, otw = (_scaled(v, scale) for v in (h, w, th, tw))
    oys, oxs = [_scaled(y, scale) for y in ys], [_scaled(x0, scale) for x0 in xs]
    wy = _axis_weights(oh, oth, oys, profile(oth))
    wx = _axis_weights(ow, otw, oxs, profile(otw))
    grid = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    out = None
    for b in range(0, len(grid), tile_batch):
        batch = grid[b : b + tile_batch]
        windows = [(ys[i], ys[i] + th, xs[j], xs[j] + tw) for i, j in batch]
        tiles = _pad_to_multiple(torch.cat([x[..., y0:y1, x0:x1] for y0, y1, x0, x1 in windows]), multiple)
        pred = fn(tiles, windows)
        want = (_scaled(tiles.shape[-2], scale), _scaled(tiles.shape[-1], scale))
        if pred.shape[0] != tiles.shape[0] or tuple(pred.shape[-2:]) != want:
            raise ValueError(
                f"tile of shape {tuple(tiles.shape)} gave {tuple(pred.shape)}, expected {want} at scale {scale}"
            )
        if out is None:
            out = pred.new_zeros(n, pred.shape[1], oh, ow)
        for (i, j), p in zip(batch, pred[..., :oth, :otw].split(n)):
            weight = wy[i].to(p)[:, None] * wx[j].to(p)  # 1-D to the device, the outer product there
            out[..., oys[i] : oys[i] + oth, oxs[j] : oxs[j] + otw] += p * weight
    return out


def tiled_denoiser(tile_fn: TileDenoiser, tile_size: int, tile_stride: int, tile_batch: int = 1) -> ModelFn:
    """A model fn (x_t, t) -> eps | v that evaluates `tile_fn` on latent tiles and blends the
    predictions with Gaussian weights at every call. A latent no larger than a tile is one tile:
    the exact untiled call."""

    def denoiser(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x_t.shape[0])
        run = lambda tiles, windows: tile_fn(tiles, t.repeat(len(windows)), windows)  # noqa: E731
        return _blend_tiles(run, x_t, tile_size, tile_stride, gaussian_profile, tile_batch=tile_batch)

    return denoiser


def cldm_tiled_denoiser(
    cldm: ControlLDM,
    c_txt: torch.Tensor,
    c_img: torch.Tensor,
    tile_size: int,
    tile_stride: int,
    control_scale: float | Sequence[float] = 1.0,
    uncond_txt: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    tile_batch: int = 1,
    rescale_cfg: bool = False,
) -> ModelFn:
    """The tiled denoiser of a ControlLDM: each tile sees its crop of the condition latent c_img,
    with classifier-free guidance as `cfg_model` (uncond_txt is the negative prompt's context)."""

    def tile_fn(x: torch.Tensor, t: torch.Tensor, windows: Sequence[Window]) -> torch.Tensor:
        k = len(windows)
        n = x.shape[0] // k
        c = torch.cat([c_img[..., y0:y1, x0:x1].expand(n, -1, -1, -1) for y0, y1, x0, x1 in windows])
        rows = lambda txt: None if txt is None else txt.expand(n, -1, -1).repeat(k, 1, 1)  # noqa: E731
        return cfg_model(cldm, c, rows(c_txt), rows(uncond_txt), cfg_scale, control_scale, rescale_cfg)(x, t)

    return tiled_denoiser(tile_fn, tile_size, tile_stride, tile_batch)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_size: int,
    overlap: int,
    scale: float = 1,
    multiple: int = 1,
    tile_batch: int = 1,
) -> torch.Tensor:
    """fn (output `scale` times the input size; scale may be 1/k) over overlapping tiles of x, each
    padded (reflect) to a multiple of `multiple`, outputs blended with linear ramps over the overlap."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"need 0 <= overlap < tile_size, got overlap {overlap}, tile_size {tile_size}")
    ramp = _scaled(overlap, scale)
    return _blend_tiles(
        lambda tiles, _: fn(tiles),
        x,
        tile_size,
        tile_size - overlap,
        lambda n: feather_profile(n, ramp),
        scale,
        multiple,
        tile_batch,
    )


def tiled_stage1(
    net: Callable[[torch.Tensor], torch.Tensor],
    image01: torch.Tensor,
    tile_size: int = 512,
    overlap: int = 64,
    scale: int = 1,
    multiple: int = 64,
    tile_batch: int = 1,
) -> torch.Tensor:
    """A stage-1 net (DiffBIR SwinIR: multiple 64; a spandrel net: its `scale`) on image tiles in [0, 1]."""
    return tiled_apply(net, image01, tile_size, overlap, scale, multiple, tile_batch)


def tiled_vae_encode(
    cldm: ControlLDM, image: torch.Tensor, tile_size: int = 512, overlap: int = 64, tile_batch: int = 1
) -> torch.Tensor:
    """image in [-1, 1] -> scaled latent (posterior mode; a per-tile sample would not blend).
    Image sides, tile_size and overlap must be multiples of 8."""
    return tiled_apply(cldm.vae_encode, image, tile_size, overlap, 1 / 8, tile_batch=tile_batch)


def tiled_vae_decode(
    cldm: ControlLDM, z: torch.Tensor, tile_size: int = 64, overlap: int = 16, tile_batch: int = 1
) -> torch.Tensor:
    """scaled latent -> image in [-1, 1] (not clamped); tile_size and overlap in latent pixels."""
    return tiled_apply(cldm.vae_decode, z, tile_size, overlap, 8, tile_batch=tile_batch)


def tiled_vae_decode_vjp(
    cldm: ControlLDM, z: torch.Tensor, grad_image: torch.Tensor, tile_size: int = 64, overlap: int = 16
) -> torch.Tensor:
    """The gradient of a loss on tiled_vae_decode(cldm, z, tile_size, overlap) with respect to z,
    given its gradient `grad_image` with respect to the decoded image: the image is a weighted sum
    of the tiles' decodes, so each tile's decoder takes its own share of `grad_image` (its blend
    weights) in one vector-Jacobian product. Memory: one tile's decoder activations at a time."""
    n, _, h, w = z.shape
    stride = tile_size - overlap
    ys, xs = tile_starts(h, tile_size, stride), tile_starts(w, tile_size, stride)
    th, tw = min(tile_size, h), min(tile_size, w)
    profile = feather_profile  # as tiled_apply blends the decodes
    wy = _axis_weights(h * 8, th * 8, [y * 8 for y in ys], profile(th * 8, overlap * 8))
    wx = _axis_weights(w * 8, tw * 8, [x * 8 for x in xs], profile(tw * 8, overlap * 8))
    out = torch.zeros_like(z)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            tile = z[..., y : y + th, x : x + tw].detach().requires_grad_(True)
            with torch.enable_grad():
                decoded = cldm.vae_decode(tile)
            share = grad_image[..., y * 8 : (y + th) * 8, x * 8 : (x + tw) * 8] * (wy[i][:, None] * wx[j]).to(
                grad_image
            )
            share = share.to(decoded.dtype)  # the decoder's dtype; the gradient comes back in z's
            out[..., y : y + th, x : x + tw] += torch.autograd.grad(decoded, tile, share)[0]
    return out
