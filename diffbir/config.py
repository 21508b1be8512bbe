"""Model-level configuration shared by the checkpoint format and the samplers."""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

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
    def preset(cls, name: Literal["v1", "v2", "v2.1"]) -> DiffusionConfig:
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


def build_parser(cls: type[BaseModel], description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """`--config FILE` plus one flag per field of `cls`: `--some-field` for `some_field`. List
    fields of scalars take several values, booleans `--x/--no-x`, dict and nested fields JSON."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_flags(parser, cls)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """Add `--config` and the flags of `cls` to `parser` (a command's own or a subcommand's)."""
    parser.add_argument("--config", help=f"YAML file of {cls.__name__} fields; flags override it")
    for name, field in cls.model_fields.items():
        default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
        help_text = (field.description or "") + default
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=help_text.strip(), **_flag(field.annotation))


def parse_config(cls: type[BaseModel], argv: list[str] | None = None, description: str = "", prog: str | None = None):
    """The config a command line names: its --config file, then its flags (see build_parser)."""
    args = vars(build_parser(cls, description, prog).parse_args(argv))
    return load_config(cls, args.pop("config"), **args)


def _flag(annotation) -> dict:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        return _flag(next(a for a in args if a is not type(None)))
    if typing.get_origin(annotation) is Annotated:
        return _flag(args[0])
    if typing.get_origin(annotation) is list and _flag(args[0]).get("type") in (int, float, str):
        return {"nargs": "+", **_flag(args[0])}
    if typing.get_origin(annotation) is Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": json.loads, "metavar": "JSON"}
