"""Arrow helpers shared by the Ray Data read tasks of the pipelines and the archive job."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import pyarrow as pa


def batched_tables(rows: Iterable[Mapping[str, Any]], schema: pa.Schema, n: int) -> Iterator[pa.Table]:
    """`rows` as tables of `n` rows (the last may be smaller), each yielded once full: a read task
    hands Ray one block at a time instead of holding everything it read."""
    rows = iter(rows)
    while batch := list(islice(rows, n)):
        yield pa.Table.from_pylist(batch, schema=schema)
