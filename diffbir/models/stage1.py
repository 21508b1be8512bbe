"""Off-the-shelf stage-1 restoration nets (BSRNet = RRDBNet x4, SCUNet, ...) through spandrel.

DiffBIR v2 uses KAIR's BSRNet and SCUNet as stage 1; spandrel already implements them with the
original key names and detects the architecture from the state dict, so no copy of them lives here.
Weights come only from the state dict passed in (nothing is downloaded).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from spandrel import ModelLoader, UnsupportedModelError
from torch import nn

from diffbir.checkpoints.io import CheckpointError


@dataclass(frozen=True)
class Stage1Net:
    module: nn.Module  # eval mode; call it on (N, C, H, W) images in [0, 1]
    arch: str  # spandrel's architecture name, e.g. "ESRGAN" (RRDBNet), "SCUNet"
    scale: int  # output size / input size


def load_spandrel_model(state_dict: Mapping[str, torch.Tensor], source: str) -> Stage1Net:
    """Build the net `state_dict` holds; `source` (e.g. the file path) names it in errors."""
    try:
        desc = ModelLoader().load_from_state_dict(dict(state_dict))
    except UnsupportedModelError as e:
        said = str(e) or "no supported architecture matches the keys"
        raise CheckpointError(
            f"{source}: spandrel does not recognise this architecture ({type(e).__name__}: {said})"
        ) from e
    except (KeyError, RuntimeError, ValueError, AssertionError, IndexError) as e:
        # detected but inconsistent (missing keys, mismatching shapes) -- raised while building the net
        raise CheckpointError(f"{source}: spandrel failed to load it ({type(e).__name__}: {e})") from e
    return Stage1Net(module=desc.model.eval(), arch=desc.architecture.name, scale=desc.scale)
