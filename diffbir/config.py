"""Model-level configuration shared by the checkpoint format and the samplers, and the one way
every command of the platform reads its typed config: a YAML file, then one flag per field."""

from __future__ import annotations

import argparse
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict

Dtype = Literal["fp32", "bf16", "fp16"]  # the one spelling of a dtype in every config and on every command line
# torch.set_float32_matmul_precision, process-wide: float32 weights and activations, products rounded
# further. "high": TF32 on NVIDIA GPUs (Ampere and later); "medium": also bf16 products on CPUs with
# AVX512-BF16/AMX (a 512² denoiser call 0.76x the time here). Convolutions are not affected on CPUs.
MatmulPrecision = Literal["highest", "high", "medium"]
MATMUL_PRECISION_HELP = "float32 matrix products: highest (exact), high (TF32 on GPUs), medium (bf16 on CPUs too)"


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


class Arg:
    """`Annotated` metadata: how a field reads on the command line besides `--field-name`.
    `positional`: given without a flag (input files: `cmd a.png b.png`), a list field any number
    of them, and still settable from the YAML; `aliases`: short forms such as `-o`."""

    def __init__(self, *aliases: str, positional: bool = False):
        self.aliases, self.positional = aliases, positional


def load_config(cls: type[BaseModel], config_file: str | Path | None = None, **overrides):
    """A typed config: YAML file values first, then every override that is not None (the CLI
    passes its flags here, so each flag is a field of `cls`). A dotted key (`prefilter.min_side`)
    sets one field of a nested section, after the undotted keys (a whole section) are applied."""
    data: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update({k: v for k, v in given.items() if "." not in k})
    for key in sorted(k for k in given if "." in k):
        *sections, name = key.split(".")
        section = data
        for part in sections:  # copies: the YAML's and the caller's mappings stay as they were
            section[part] = dict(section.get(part) or {})
            section = section[part]
        section[name] = given[key]
    return cls(**data)


def build_parser(
    cls: type[BaseModel], description: str = "", prog: str | None = None, default_config: str | Path | None = None
) -> argparse.ArgumentParser:
    """`--config FILE` plus one argument per field of `cls`: `--some-field` for `some_field`.
    Literal fields list their choices, list fields of scalars take several values (repeating the
    flag adds more), booleans are `--x/--no-x`, dict and optional nested fields JSON. A nested
    model field `sec` takes JSON for the whole section (`--sec '{"a": 1}'`) and also one flag per
    field of it, `--sec.a 1` (recursively: `--sec.sub.b`), listed in its own group of --help.
    `Annotated[..., Arg(...)]` makes a field positional or gives it short aliases."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_flags(parser, cls, default_config)
    return parser


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type[BaseModel], default_config: str | Path | None = None
) -> None:
    """Add `--config` and the arguments of `cls` (see build_parser) to `parser`, a command's own or
    a subcommand's; `config_from_args` reads them back."""
    where = f" (default: {default_config})" if default_config else ""
    parser.add_argument(
        "--config", default=default_config, help=f"YAML file of {cls.__name__} fields; flags override it{where}"
    )
    _add_fields(parser, parser, cls, "")


def config_from_args(cls: type[BaseModel], args: argparse.Namespace):
    """The config a parsed command line names: its --config file, then its flags."""
    values = {k: v for k, v in vars(args).items() if k.split(".")[0] in cls.model_fields}
    return load_config(cls, args.config, **values)


def parse_config(
    cls: type[BaseModel],
    argv: list[str] | None = None,
    description: str = "",
    prog: str | None = None,
    default_config: str | Path | None = None,
):
    """The config a command line names: its --config file, then its flags (see build_parser)."""
    return config_from_args(cls, build_parser(cls, description, prog, default_config).parse_args(argv))


def _add_fields(parser: argparse.ArgumentParser, group, cls: type[BaseModel], prefix: str) -> None:
    for name, field in cls.model_fields.items():
        dest = prefix + name
        nested = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        if nested:
            help_text = field.description or f"the whole section as JSON, or its fields one by one (--{dest}.FIELD)"
        else:
            default = "" if field.is_required() else f" (default: {field.get_default(call_default_factory=True)})"
            help_text = ((field.description or "") + default).strip()
        arg = next((m for m in field.metadata if isinstance(m, Arg)), Arg())
        kind = _flag(field.annotation)
        if arg.positional:  # absent from the namespace when not given, so the YAML's value stands
            kind["nargs"] = "*" if "nargs" in kind else "?"
            kind.pop("action", None)
            group.add_argument(dest, default=argparse.SUPPRESS, help=help_text, **kind)
        else:
            if "type" in kind and "choices" not in kind:
                kind.setdefault("metavar", name.upper())  # not SECTION.NAME
            group.add_argument(*arg.aliases, "--" + dest.replace("_", "-"), dest=dest, help=help_text, **kind)
        if nested:
            section = parser.add_argument_group(f"--{dest}.* ({field.annotation.__name__})", _summary(field.annotation))
            _add_fields(parser, section, field.annotation, dest + ".")


def _summary(cls: type) -> str | None:
    return inspect.cleandoc(cls.__doc__).split("\n\n")[0] if cls.__doc__ else None


def _flag(annotation) -> dict:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        return _flag(next(a for a in args if a is not type(None)))
    if typing.get_origin(annotation) is Annotated:
        return _flag(args[0])
    if typing.get_origin(annotation) is list and _flag(args[0]).get("type") in (int, float, str):
        return {"nargs": "+", "action": "extend", **_flag(args[0])}
    if typing.get_origin(annotation) is Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": json.loads, "metavar": "JSON"}
