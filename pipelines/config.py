"""Config field types shared by the pipelines and the training configs built on them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator


def _absolute(path: str) -> str:
    """Local paths become absolute where a config is read (the driver), so that workers with
    another working directory find them; URLs stay as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


# a local path or an fsspec URL
Location = Annotated[str, AfterValidator(_absolute)]
# a bundled degradation model's name, or a YAML file (a Location)
Degradation = Annotated[str, AfterValidator(lambda s: _absolute(s) if s.endswith((".yaml", ".yml")) else s)]
