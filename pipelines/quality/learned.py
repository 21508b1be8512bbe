"""Learned no-reference IQA for the quality filter: the `LearnedIQA` protocol, a registry of
scorers by name, loading from local weights only, and `TorchIQA`, a base for torch scorers.
`pipelines.quality.dataset.learned_iqa_stage` runs one as a streaming stage on (GPU) actors."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class LearnedIQAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="a name registered with register_learned_iqa, or 'module:Class'")
    weights_path: str = Field(description="local weights file; nothing is downloaded")
    min_score: float
    actors: int = Field(1, ge=1, le=1024, description="scoring actors of the learned-IQA stage (one model each)")
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per actor; 0: the actors score on CPU")
    batch_size: int = Field(32, ge=1, le=4096, description="images per scoring call")


class LearnedIQA(Protocol):
    """A no-reference quality model (MUSIQ, MANIQA, CLIP-IQA, ...) wrapped for the filter."""

    def load(self, weights_path: str) -> None: ...

    def score(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any size → one score each (higher is better)."""
        ...


LEARNED_IQA: dict[str, type] = {}


def register_learned_iqa(name: str):
    """Class decorator. Stages resolve the class on the driver and send it to their actors, so
    a registration made by the driver's code holds there too."""

    def add(cls: type) -> type:
        LEARNED_IQA[name] = cls
        return cls

    return add


def learned_iqa_class(config: LearnedIQAConfig) -> type:
    """The scorer class `config.name` names: registered, or imported from 'module:Class'."""
    if config.name in LEARNED_IQA:
        return LEARNED_IQA[config.name]
    if ":" in config.name:
        module, _, attr = config.name.partition(":")
        return getattr(importlib.import_module(module), attr)
    raise KeyError(f"unknown learned IQA {config.name!r}: registered {sorted(LEARNED_IQA)}, or give 'module:Class'")


def load_learned_iqa(config: LearnedIQAConfig, cls: type | None = None) -> LearnedIQA:
    """The scorer with its weights; `cls` (else looked up by `learned_iqa_class`) lets a Ray
    actor use the class the driver resolved."""
    cls = cls or learned_iqa_class(config)
    path = Path(config.weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"learned IQA {config.name!r}: weights file {path} does not exist. Weights are never "
            "downloaded: copy the file there or fix learned_iqa.weights_path."
        )
    scorer = cls()
    scorer.load(str(path))
    return scorer


class TorchIQA(ABC):
    """Base for torch scorers: a subclass gives `build()` (the untrained network, mapping an
    N×3×S×S float batch in [0, 1] to N scores) and `input_size`; `load` fills it from a state
    dict in .safetensors or a torch.save file (read with weights_only=True: never unpickles code),
    onto the GPU where the process has one (a learned-IQA actor with `num_gpus`)."""

    input_size = 224

    @abstractmethod
    def build(self):
        """The untrained scoring network."""

    def load(self, weights_path: str) -> None:
        import torch

        if weights_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights_path)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.build().eval()
        self.model.load_state_dict(state)
        self.model.to(self.device)

    def score(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        s = self.input_size
        x = np.stack([cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA) for im in batch])
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 255)
        return out.reshape(len(batch)).float().cpu().numpy()
