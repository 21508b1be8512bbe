"""Captioners: a caption of each input image leads its positive prompt, as the official inference's
`--captioner` (LLaVA or RAM) does: prompt = ", ".join of the caption and the configured prompt,
the empty ones left out, computed from the low-quality input before restoring it.

Any image-to-text model that transformers loads from a local folder (`save_pretrained` layout:
config.json, weights, processor and tokenizer files) serves: BLIP, BLIP-2, InstructBLIP, GIT,
LLaVA, LLaVA-NeXT, Qwen2-VL... (AutoModelForImageTextToText + AutoProcessor). A processor with a
chat template (LLaVA-style) is asked `instruction`; one without (BLIP-style) captions unprompted.
Nothing is ever downloaded (local_files_only). A captioner that fails, or writes nothing, never
fails a restoration: the image gets the configured prompt alone and the failure is recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 256  # a caption is a phrase: the text tower reads 77 tokens of the whole prompt
# the official LLaVA captioner's question (reference diffbir/utils/caption.py)
OFFICIAL_INSTRUCTION = "Please give me a very short description of this image."


class Captioner(Protocol):
    """Images (RGB float (H, W, 3) in [0, 1]) -> one caption each, in order."""

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]: ...


@dataclass(frozen=True)
class Caption:
    """The caption of one image ("" when none was asked for or made) and why it failed, if it did."""

    text: str = ""
    error: str | None = None


def combine_prompt(caption: str, prompt: str) -> str:
    """The positive prompt of an image: its caption, then the configured prompt (the official order)."""
    return ", ".join(text for text in (caption, prompt) if text)


def caption_batch(captioner: Captioner, images: Sequence[np.ndarray]) -> list[Caption]:
    """`captioner` on `images` in one call; when that raises, each image alone again (one image it
    cannot take, or a batch too large for memory, loses no other caption). An exception or an empty
    caption becomes the image's recorded error (and a log line), never an exception: restoring
    goes on without the caption."""
    if not images:
        return []
    try:
        texts = captioner(images)
        if len(texts) != len(images):
            raise ValueError(f"the captioner returned {len(texts)} captions for {len(images)} images")
    except Exception as e:  # noqa: BLE001 -- any failure of a plugged-in model: recorded, restoring goes on
        logger.warning("captioning %d images failed: %r", len(images), e)
        if len(images) > 1:
            return [caption for image in images for caption in caption_batch(captioner, [image])]
        return [Caption(error=f"{type(e).__name__}: {e}")]
    captions = [
        Caption(t.strip()) if isinstance(t, str) and t.strip() else Caption(error="empty caption") for t in texts
    ]
    if empty := sum(c.error is not None for c in captions):
        logger.warning("the captioner returned %d empty captions of %d", empty, len(images))
    return captions


class TransformersCaptioner:
    """A local transformers image-to-text model, batched, on one device."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 40,
        batch_size: int = 8,
        instruction: str = OFFICIAL_INSTRUCTION,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor  # heavy: only when a captioner is used

        path = Path(path)
        check_model_folder(path)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"captioner max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"captioner batch_size must be at least 1, got {batch_size}")
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"captioner {path}: not a loadable image-to-text model: {e}") from e
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prompt = None  # BLIP-style: captions unprompted
        if getattr(self.processor, "chat_template", None):  # LLaVA-style: asked in the model's chat format
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            tokenizer = getattr(self.processor, "tokenizer", None)
            if tokenizer is not None:  # prompts of different lengths: generation continues on the right
                tokenizer.padding_side = "left"

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        captions = []
        for start in range(0, len(images), self.batch_size):
            chunk = [Image.fromarray(_uint8(im)) for im in images[start : start + self.batch_size]]
            text = None if self.prompt is None else [self.prompt] * len(chunk)
            inputs = self.processor(images=chunk, text=text, return_tensors="pt", padding=text is not None)
            inputs = {
                k: v.to(self.device, self.dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
                for k, v in inputs.items()
            }
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            prompt_ids = inputs.get("input_ids")
            if prompt_ids is not None and ids.shape[1] >= prompt_ids.shape[1]:
                # decoder-only models return the prompt before the answer
                if torch.equal(ids[:, : prompt_ids.shape[1]].cpu(), prompt_ids.cpu()):
                    ids = ids[:, prompt_ids.shape[1] :]
            captions += [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return captions


def check_model_folder(path: Path) -> None:
    """A clear error unless `path` looks like a transformers model folder."""
    if not path.is_dir():
        raise ValueError(f"captioner {path}: no such folder (a transformers model saved with save_pretrained)")
    if not (path / "config.json").is_file():
        raise ValueError(f"captioner {path}: no config.json, not a transformers model folder (save_pretrained)")


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8)


class CaptionerSettings(BaseModel):
    """The captioner fields of an entry point's config (`diffbir restore`, the server, the archive
    job): a server-side model, so never a request's option."""

    model_config = ConfigDict(extra="forbid")

    captioner: str | None = Field(
        None,
        description="folder of a local transformers image-to-text model (BLIP, BLIP-2, LLaVA...) whose caption of "
        "each input leads its positive prompt (none: off)",
    )
    captioner_max_new_tokens: int = Field(40, ge=1, le=MAX_NEW_TOKENS, description="longest caption, in tokens")
    captioner_batch_size: int = Field(8, ge=1, le=64, description="images captioned in one model call")
    captioner_instruction: str = Field(
        OFFICIAL_INSTRUCTION, max_length=1000, description="what a chat captioner (LLaVA-style) is asked"
    )

    @field_validator("captioner")
    @classmethod
    def _a_model_folder(cls, v: str | None) -> str | None:
        if v is not None:
            check_model_folder(Path(v))  # at start-up, not when the first image comes
        return v

    def load_captioner(self, device: str | torch.device, dtype: torch.dtype) -> TransformersCaptioner | None:
        """The configured captioner on `device` (the pipeline's), or None when it is off."""
        if self.captioner is None:
            return None
        return TransformersCaptioner(
            self.captioner,
            device,
            dtype,
            self.captioner_max_new_tokens,
            self.captioner_batch_size,
            self.captioner_instruction,
        )
