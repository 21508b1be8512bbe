"""Reading checkpoint files without unpickling code and without a second copy of the weights.

safetensors files are memory-mapped; torch pickles are opened with `weights_only=True` (no code
runs) and `mmap=True`, so tensors stay file-backed until a module takes them with `assign=True`.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, unknown layout or mismatching keys."""


StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    """The flat tensor dict stored in `path` (safetensors or a torch pickle), wrappers removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to unpickle (only tensors and plain containers are allowed; "
            f"convert the file in a trusted environment if you trust it): {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
    return unwrap(obj, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files)."""
    path = Path(path)
    if not _is_safetensors(path):
        return {}
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def unwrap(obj: object, path: str | Path = "<state dict>") -> StateDict:
    """Apply the reference loader's rules: take a top-level 'state_dict' if present, and strip a
    'module.' prefix (DataParallel/DDP) when the first key has it."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: contains no tensors (top-level keys: {preview_keys(obj.keys())})")
    if next(iter(sd)).startswith("module."):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"


def preview_keys(keys, n: int = 8) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more
