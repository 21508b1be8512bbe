"""Region-adaptive restoration guidance (DiffBIR paper §3.4; reference: tag v2.0.0 utils/cond_fn.py
and SpacedSampler.apply_cond_fn; golden README §6), as an x0 hook that works with every sampler.

At each model evaluation with t_stop < t+1 < t_start, `repeat` times:
  loss = sum_batch mean_{c,h,w} W * (pred - target)^2,  pred = D(x0) (rgb) or x0 (latent)
  g = -3000 * scale * dloss/dpred;  x0 <- x0 + (J_D^T g or g) / c
where c = step.x0_coef, the sampler's own weight of this x0 in its next state (denoiser.x0_coef).
The rule: one user scale moves the sampler's next state by J^T g per step, whatever the sampler.
For the spaced DDPM c is posterior_mean_coef1, the reference's divisor (its posterior mean moves by
g); a deterministic sampler weighs x0 about half as much per step, so its x0 moves twice as far; a
sampler that evaluates the model twice per step (Heun, DPM-2) splits the push between the two.

Cost per repetition in pixel space: one VAE decoder forward and one backward (a vector-Jacobian
product to x0 only - no parameter gradients); the logged loss comes from that same forward. Memory:
the decoder runs layer by layer under (selective) activation checkpointing (lean_decode), so a
512x512 update holds under half of the activations autograd would keep, and is no slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from diffbir.sampling.denoiser import NoiseFn, Step, gaussian_noise
from diffbir.sampling.tiling import tiled_apply, tiled_vae_decode, tiled_vae_decode_vjp

REFERENCE_SCALE = 3000.0  # the reference multiplies the user's scale by this
_GRAY = (0.2989, 0.5870, 0.1140)
_SOBEL = ([[1, 0, -1], [2, 0, -2], [1, 0, -1]], [[1, 2, 1], [0, 0, 0], [-1, -2, -1]])


def weight_map(target01: torch.Tensor) -> torch.Tensor:
    """W = 1 - tanh(sum over each 2x2 block of the Sobel gradient magnitude of the gray image):
    low weight on edges and texture, where the stage-1 output is least trustworthy. (N,3,H,W) in
    [0, 1] with even H, W -> (N,1,H,W)."""
    n, _, h, w = target01.shape
    if h % 2 or w % 2:
        raise ValueError(f"the weight map needs an even image size, got {h}x{w}")
    gray = (target01 * target01.new_tensor(_GRAY).view(1, 3, 1, 1)).sum(1, keepdim=True)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), target01.new_tensor(_SOBEL).unsqueeze(1))
    mag = grad.pow(2).sum(1, keepdim=True).sqrt()
    blocks = mag.view(n, 1, h // 2, 2, w // 2, 2).sum((3, 5))
    return (1 - blocks.tanh()).repeat_interleave(2, -2).repeat_interleave(2, -1)


def _keep_convolutions(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.convolution.default else CheckpointPolicy.PREFER_RECOMPUTE


def _lean(fn, x: torch.Tensor, keep_convolutions: bool = True) -> torch.Tensor:
    """fn(x) whose backward recomputes everything but, with keep_convolutions, the convolutions
    (kept from the forward); without, it keeps only x."""
    if not keep_convolutions:
        return checkpoint(fn, x, use_reentrant=False)
    context = functools.partial(create_selective_checkpoint_contexts, _keep_convolutions)
    return checkpoint(fn, x, use_reentrant=False, context_fn=context)


def lean_decode(cldm, z: torch.Tensor) -> torch.Tensor:
    """cldm.vae_decode(z) for a backward pass, with under half of the activation memory: diffusers'
    decoder (AutoencoderKL._decode, Decoder.forward without latent_embeds) walked layer by layer,
    each resnet, upsampler, the middle block and the output head checkpointed on its own. The
    low-resolution layers keep their convolutions' outputs (only GroupNorm / SiLU / upsampling are
    recomputed); the layers at half and full resolution, where activations are largest, keep only
    their inputs and recompute their convolutions too. Measured at 512x512 fp32 (RESULTS.md): 2.6
    instead of 6.0 GB above the weights, and no slower (the recomputed work is cheaper than the
    memory traffic it saves). Written here because diffusers checkpoints only whole up-blocks."""
    vae, decoder = cldm.vae, cldm.vae.decoder
    h = (z / cldm.latent_scale_factor).to(vae.dtype)
    if vae.post_quant_conv is not None:
        h = vae.post_quant_conv(h)
    h = _lean(decoder.mid_block, decoder.conv_in(h))
    large = len(decoder.up_blocks) - 2  # the blocks from here on work at half and full resolution
    for k, block in enumerate(decoder.up_blocks):
        for resnet in block.resnets:
            h = _lean(functools.partial(resnet, temb=None), h, keep_convolutions=k < large)
        for upsampler in block.upsamplers or []:
            h = _lean(upsampler, h, keep_convolutions=k + 1 < large)
    return _lean(lambda x: decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x))), h, False)


def guidance_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the batch of the (weighted) mean squared error over channels and pixels."""
    err = (pred - target).pow(2)
    return (err if weight is None else err * weight).mean((1, 2, 3)).sum()


@dataclass
class GuidanceUpdate:
    """One repetition: the updated x0 and what led to it."""

    x0: torch.Tensor
    loss: float
    grad_pred_scaled: torch.Tensor  # g = -scale * dloss/dpred
    delta: torch.Tensor  # g carried to x0 (J^T g in pixel space), before division by the coefficient
    pred: torch.Tensor  # decoded x0 (rgb) or x0 (latent), before the update
    target: torch.Tensor


class RestorationGuidance:
    """x0 hook pulling the sample towards `target` (the stage-1 restoration in [-1, 1], the size of
    the decoded latent). `scale` is the user's scale; `noise` draws the latent-space target's
    posterior samples. `tiles` = (latent tile size, overlap): in pixel space, decode and carry the
    gradient back tile by tile (tiled_vae_decode and its exact vector-Jacobian product), so memory
    stays that of one tile (the cost: one more decoder forward per tile); in latent space, encode
    the target tile by tile (posterior mean and std blended like tiled_vae_encode)."""

    def __init__(
        self,
        cldm,
        target: torch.Tensor,
        scale: float,
        *,
        space: Literal["rgb", "latent"] = "rgb",
        weighted: bool = True,
        repeat: int = 1,
        t_start: float = 1001,
        t_stop: float = -1,
        noise: NoiseFn | None = None,
        tiles: tuple[int, int] | None = None,
    ):
        if space not in ("rgb", "latent"):
            raise ValueError(f"guidance space must be 'rgb' or 'latent', got {space!r}")
        self.cldm, self.space, self.repeat, self.tiles = cldm, space, repeat, tiles
        self.scale = REFERENCE_SCALE * scale
        self.t_start, self.t_stop = t_start, t_stop
        self.target = target
        self.weight = weight_map((target + 1) / 2) if weighted else None
        self.losses: list[float] = []  # every repetition's loss, in order
        if space == "latent":
            # encoded once; each repetition draws a fresh posterior sample, as the reference does
            self._mean, self._std = self._encode(target)
            self._noise, self._draws = noise or gaussian_noise(), 0
            if self.weight is not None:  # the reference crashes here (3-channel W on a 4-channel latent)
                self.weight = F.avg_pool2d(self.weight, target.shape[-1] // self._mean.shape[-1])

    @torch.no_grad()
    def _encode(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's VAE posterior (mean, std), tile by tile when tiling."""

        def moments(image: torch.Tensor) -> torch.Tensor:
            posterior = self.cldm.vae.encode(image).latent_dist
            return torch.cat([posterior.mean, posterior.std], 1)

        if self.tiles is None:
            return moments(target).chunk(2, 1)
        tile, overlap = self.tiles
        return tiled_apply(moments, target, tile * 8, overlap * 8, 1 / 8).chunk(2, 1)

    def _target(self) -> torch.Tensor:
        if self.space == "rgb":
            return self.target
        z = self._mean + self._std * self._noise(self._mean, self._draws)
        self._draws += 1
        return z * self.cldm.latent_scale_factor

    def update(self, x0: torch.Tensor, coef: float) -> GuidanceUpdate:
        """One guidance repetition with x0 coefficient `coef`."""
        target = self._target()
        rgb = self.space == "rgb"
        if rgb and self.tiles:
            return self._tiled_update(x0, target, coef)
        with torch.enable_grad():
            x0 = x0.detach().requires_grad_(rgb)
            pred = lean_decode(self.cldm, x0) if rgb else x0
            leaf = pred.detach().float().requires_grad_(True)  # the loss in float32 whatever the VAE's dtype
            loss = guidance_loss(leaf, target, self.weight)
            g = -self.scale * torch.autograd.grad(loss, leaf)[0]
            delta = torch.autograd.grad(pred, x0, g.to(pred.dtype))[0] if rgb else g
        self.losses.append(loss.item())
        return GuidanceUpdate(x0.detach() + delta / coef, self.losses[-1], g, delta, pred.detach(), target)

    def _tiled_update(self, x0: torch.Tensor, target: torch.Tensor, coef: float) -> GuidanceUpdate:
        with torch.no_grad():
            pred = tiled_vae_decode(self.cldm, x0, *self.tiles)
        with torch.enable_grad():
            leaf = pred.float().requires_grad_(True)
            loss = guidance_loss(leaf, target, self.weight)
            g = -self.scale * torch.autograd.grad(loss, leaf)[0]
        delta = tiled_vae_decode_vjp(self.cldm, x0, g, *self.tiles)
        self.losses.append(loss.item())
        return GuidanceUpdate(x0 + delta / coef, self.losses[-1], g, delta, pred.detach(), target)

    def __call__(self, x0: torch.Tensor, step: Step) -> torch.Tensor:
        if not self.t_stop < step.t + 1 < self.t_start:
            return x0
        for _ in range(self.repeat):
            x0 = self.update(x0, step.x0_coef).x0
        return x0
