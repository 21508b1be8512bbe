"""Model-level configuration shared by the checkpoint format and the samplers."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml

from pydantic import BaseModel, ConfigDict


class DiffusionConfig(BaseModel):
    """The noise schedule the weights were trained with. v1/v2 weights: scaled-linear betas with
    eps prediction; v2.1 weights: the same betas made zero-terminal-SNR, with v prediction."""

    model_config = ConfigDict(extra="forbid")

    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    zero_snr: bool = False
    parameterization: Literal["eps", "v"] = "eps"

    @classmethod
    def preset(cls, name: Literal["v1", "v2", "v2.1"]) -> "DiffusionConfig":
        return cls(zero_snr=True, parameterization="v") if name == "v2.1" else cls()


def load_config(cls: type[BaseModel], config_file: str | Path | None = None, **overrides):
    """A typed config: YAML file values first, then every override that is not None (the CLI
    passes its flags here, so each flag is a field of `cls`)."""
    data: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**data)
