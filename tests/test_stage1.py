"""Off-the-shelf stage-1 nets (BSRNet, SCUNet) load through spandrel from their released key layouts."""

from __future__ import annotations

import json
import re

import pytest
import torch

from diffbir.checkpoints.io import CheckpointError
from diffbir.models.stage1 import load_spandrel_model
from diffbir.utils.keyed_init import keyed_state_dict

from conftest import MANIFESTS


def manifest_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Random (key-seeded, variance 1/fan_in) values of the manifest's keys and shapes."""
    keys = json.loads((MANIFESTS / f"{name}.json").read_text())["keys"]
    assert {v["dtype"] for v in keys.values()} == {"float32"}
    return keyed_state_dict({k: v["shape"] for k, v in keys.items()}, salt=0)


@pytest.mark.parametrize(
    "manifest, arch, scale, side",
    [
        ("bsrnet_rrdbnet_x4", "ESRGAN", 4, 32),  # KAIR RRDBNet; spandrel calls the family ESRGAN
        ("scunet_color_real_psnr", "SCUNet", 1, 64),  # SCUNet pads to x64 itself; 64 avoids padding
    ],
)
def test_manifest_loads_and_runs(manifest, arch, scale, side):
    net = load_spandrel_model(manifest_state_dict(manifest), source=f"{manifest}.pth")
    assert (net.arch, net.scale) == (arch, scale)
    assert not net.module.training
    with torch.no_grad():
        out = net.module(torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 3, side * scale, side * scale)
    assert torch.isfinite(out).all()


def test_unknown_architecture_raises():
    garbage = {"foo.weight": torch.zeros(4, 3), "bar.bias": torch.zeros(4)}
    with pytest.raises(CheckpointError, match="garbage.pth.*spandrel"):
        load_spandrel_model(garbage, source="garbage.pth")


def test_inconsistent_state_dict_raises():
    """Detected as SCUNet but a tensor has the wrong shape: spandrel's loading error, named."""
    sd = manifest_state_dict("scunet_color_real_psnr")
    key = next(k for k in sd if k.endswith("embedding_layer.weight"))
    sd[key] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match=f"(?s)broken.pth.*{re.escape(key)}"):
        load_spandrel_model(sd, source="broken.pth")
