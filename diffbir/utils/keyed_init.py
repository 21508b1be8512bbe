"""Deterministic key-based weight initialisation (golden README, section 4).

Every tensor gets values derived only from its checkpoint key, so a full-size model can be
re-created bit-for-bit without shipping gigabytes of weights: parity tests build the reference's
full-size weights with it, and benchmarks use it for realistic random weights. No library offers
this generator, hence the hand-written SplitMix64 (vectorised in numpy, chunked to bound memory).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 22

# Buffers the module computes from its config; the initialisation keeps them.
COMPUTED_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")


def _splitmix_uniform(seed: int, start: int, count: int) -> np.ndarray:
    """Outputs start+1 .. start+count of SplitMix64 from state `seed`, as s = 2u - 1 in [-1, 1)."""
    k = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + k * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    return 2.0 * u - 1.0


def key_seed(key: str, salt: int) -> int:
    return (zlib.crc32(key.encode("utf-8")) + salt * 2**32) % 2**64


def keyed_tensor(key: str, shape: Iterable[int], salt: int) -> torch.Tensor:
    """The float32 tensor the procedure assigns to `key` with this shape."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    seed = key_seed(key, salt)
    if len(shape) >= 2:
        scale = np.sqrt(3.0 / float(np.prod(shape[1:])))
        transform = lambda s: s * scale  # noqa: E731
    elif len(shape) == 1 and key.endswith(".weight"):
        transform = lambda s: 1.0 + 0.2 * s  # noqa: E731
    else:
        transform = lambda s: 0.2 * s  # noqa: E731
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        out[start : start + count] = transform(_splitmix_uniform(seed, start, count))
    return torch.from_numpy(out).reshape(shape)


def keyed_state_dict(
    shapes: Mapping[str, Iterable[int]], salt: int, computed: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A state dict for `shapes` (checkpoint key -> shape). Keys ending in a computed-buffer suffix
    take their value from `computed` (what the module itself builds) and are required there."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith(COMPUTED_BUFFER_SUFFIXES):
            if computed is None or key not in computed:
                raise KeyError(f"{key} is a computed buffer: pass the module's own value in `computed`")
            out[key] = computed[key]
        else:
            out[key] = keyed_tensor(key, shape, salt)
    return out
