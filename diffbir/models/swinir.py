"""DiffBIR's stage-1 SwinIR restoration module (pixel-unshuffle x8 -> RSTBs -> nearest x2 three times).

The transformer body reuses spandrel's vendored KAIR SwinIR blocks (RSTB, PatchEmbed, PatchUnEmbed):
their code is line-for-line the reference's (same window attention, relative position bias, shifted
window masks recomputed for other feature sizes, key names `residual_group.blocks.M.attn...`), so
writing them again would only add code to keep in sync. spandrel's top-level SwinIR class is not
used: it names the first conv `conv_first` (DiffBIR: `conv_first.1` after a PixelUnshuffle) and
keeps the RGB mean as a plain tensor attribute.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import re
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from diffbir.checkpoints.io import CheckpointError

_arch = importlib.import_module("spandrel.architectures.SwinIR.__arch.SwinIR")
RSTB, PatchEmbed, PatchUnEmbed = _arch.RSTB, _arch.PatchEmbed, _arch.PatchUnEmbed
SwinTransformerBlock = _arch.SwinTransformerBlock

RGB_MEAN = (0.4488, 0.4371, 0.4040)
NUM_FEAT = 64  # channels of the reconstruction head, fixed in the reference


class SwinIRConfig(BaseModel):
    """Constructor arguments in the reference's names; defaults are configs/inference/swinir.yaml."""

    model_config = ConfigDict(extra="forbid")

    img_size: int = 64
    patch_size: int = 1
    in_chans: int = 3
    embed_dim: int = 180
    depths: list[int] = Field(default_factory=lambda: [6] * 8)
    num_heads: list[int] = Field(default_factory=lambda: [6] * 8)
    window_size: int = 8
    mlp_ratio: float = 2.0
    sf: int = 8
    img_range: float = 1.0
    upsampler: str = "nearest+conv"
    resi_connection: str = "1conv"
    unshuffle: bool = True
    unshuffle_scale: int = 8

    @model_validator(mode="after")
    def _supported(self) -> SwinIRConfig:
        if self.upsampler != "nearest+conv" or self.sf != 8:
            raise ValueError(
                f"only upsampler 'nearest+conv' with sf 8 is supported (DiffBIR's stage 1), "
                f"got upsampler {self.upsampler!r}, sf {self.sf}"
            )
        if not self.unshuffle or self.unshuffle_scale != self.sf:
            # the reference unshuffles by `sf` but sizes conv_first by `unshuffle_scale`
            raise ValueError(
                f"only unshuffle=True with unshuffle_scale == sf ({self.sf}) is supported, "
                f"got unshuffle={self.unshuffle}, unshuffle_scale={self.unshuffle_scale}"
            )
        if self.resi_connection != "1conv":
            raise ValueError(f"only resi_connection '1conv' is supported, got {self.resi_connection!r}")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must be non-empty and equally long")
        if any(self.embed_dim % h for h in self.num_heads):
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by every num_heads {self.num_heads}")
        res = self.img_size // self.patch_size
        if res > self.window_size and res % self.window_size:
            raise ValueError(f"img_size {self.img_size} must be a multiple of window_size {self.window_size}")
        return self

    @property
    def pad_multiple(self) -> int:
        """Image sides must be a multiple of this: unshuffle, then whole windows."""
        return self.sf * self.window_size

    @classmethod
    def infer(cls, sd: Mapping[str, torch.Tensor]) -> SwinIRConfig:
        """The config of a DiffBIR SwinIR state dict, from its key names and shapes."""
        table = lambda i: sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"]  # noqa: E731
        block0 = "layers.0.residual_group.blocks.0."
        need = (
            "conv_first.1.weight",
            "conv_last.weight",
            block0 + "mlp.fc1.weight",
            block0 + "attn.relative_position_bias_table",
        )
        missing = [k for k in need if k not in sd]
        if missing:
            raise CheckpointError(f"not a DiffBIR SwinIR state dict: missing {missing}")
        blocks: dict[int, int] = {}
        for key in sd:
            m = re.match(r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.", key)
            if m:
                layer, block = int(m[1]), int(m[2])
                blocks[layer] = max(blocks.get(layer, 0), block + 1)
        depths = [blocks[i] for i in range(len(blocks))]
        window = (math.isqrt(table(0).shape[0]) + 1) // 2  # table is [(2w-1)^2, heads]
        embed_dim, in_unshuffled = sd["conv_first.1.weight"].shape[:2]
        in_chans = sd["conv_last.weight"].shape[0]
        hidden = sd[block0 + "mlp.fc1.weight"].shape[0]
        # attn_mask [nW, w^2, w^2] exists only in shifted blocks; nW = (img_size / w)^2
        masks = [v for k, v in sd.items() if k.endswith("attn_mask")]
        img_size = window * math.isqrt(masks[0].shape[0]) if masks else cls.model_fields["img_size"].default
        sf = 8 if "conv_up3.weight" in sd else 4 if "conv_up2.weight" in sd else 2
        return cls(
            img_size=img_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=[table(i).shape[1] for i in range(len(depths))],
            window_size=window,
            mlp_ratio=hidden / embed_dim,
            sf=sf,
            upsampler="nearest+conv" if "conv_up1.weight" in sd else "",
            resi_connection="1conv" if "conv_after_body.weight" in sd else "3conv",
            unshuffle_scale=math.isqrt(in_unshuffled // in_chans),
        )


class SwinIR(nn.Module):
    """DiffBIR SwinIR (upsampler 'nearest+conv', unshuffle x8): image in [0,1] -> image of the same size."""

    def __init__(self, config: SwinIRConfig):
        super().__init__()
        c = self.config = config
        dim, res = c.embed_dim, c.img_size // c.patch_size
        self.conv_first = nn.Sequential(
            nn.PixelUnshuffle(c.sf), nn.Conv2d(c.in_chans * c.unshuffle_scale**2, dim, 3, 1, 1)
        )
        patches = dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=dim, embed_dim=dim)
        self.patch_embed = PatchEmbed(**patches, norm_layer=nn.LayerNorm)
        self.patch_unembed = PatchUnEmbed(**patches)
        # drop_path 0: inference only (DropPath is the identity in eval mode anyway)
        with _quiet_meshgrid():
            self.layers = nn.ModuleList(
                RSTB(
                    dim=dim,
                    input_resolution=(res, res),
                    depth=depth,
                    num_heads=heads,
                    window_size=c.window_size,
                    mlp_ratio=c.mlp_ratio,
                    drop_path=0.0,
                    img_size=c.img_size,
                    patch_size=c.patch_size,
                    resi_connection="1conv",
                )
                for depth, heads in zip(c.depths, c.num_heads)
            )
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1)
        # LeakyReLU default slope 0.01 here, 0.2 (self.lrelu) in the upsampling path, as in the reference
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.conv_up1 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        self.conv_up3 = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        self.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        self.conv_last = nn.Conv2d(NUM_FEAT, c.in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        # The mean is built in forward, not kept as a buffer: a non-persistent buffer would stay
        # on the meta device after `load_state_dict(assign=True)`.
        self._mean = RGB_MEAN if c.in_chans == 3 else (0.0,) * c.in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.pad_multiple
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(f"expected an (N, {self.config.in_chans}, H, W) image, got shape {tuple(x.shape)}")
        if x.shape[2] % m or x.shape[3] % m:
            # the reference fails inside window_partition; the pipeline pads before calling us
            raise ValueError(
                f"image size {tuple(x.shape[2:])} is not a multiple of {m}: pad the image to a multiple of {m}"
            )
        mean = torch.tensor(self._mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = self.conv_first((x - mean) * self.config.img_range)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        for conv in (self.conv_up1, self.conv_up2, self.conv_up3):
            x = self.lrelu(conv(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        return x / self.config.img_range + mean

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x, x_size)
        return self.patch_unembed(self.norm(x), x_size)


def swinir_computed_buffers(config: SwinIRConfig) -> dict[str, torch.Tensor]:
    """The persistent buffers SwinIR computes from its config (relative_position_index, attn_mask for
    img_size), keyed as in its state dict; built by the same block code as the module itself."""
    res = config.img_size // config.patch_size
    with torch.device("cpu"), _quiet_meshgrid():  # real values even under a meta-device context
        ref = SwinTransformerBlock(
            dim=1,
            input_resolution=(res, res),
            num_heads=1,
            window_size=config.window_size,
            shift_size=config.window_size // 2,
        )
    out = {}
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            prefix = f"layers.{i}.residual_group.blocks.{j}."
            out[prefix + "attn.relative_position_index"] = ref.attn.relative_position_index.clone()
            if j % 2 and ref.attn_mask is not None:
                out[prefix + "attn_mask"] = ref.attn_mask.clone()
    return out


@contextlib.contextmanager
def _quiet_meshgrid():
    """spandrel's blocks call torch.meshgrid without `indexing` (the default "ij" is what they mean)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        yield
