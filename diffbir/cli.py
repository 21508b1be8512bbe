"""`diffbir` command line: info and convert (restore and eval build on the same entry point)."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from diffbir.checkpoints.info import describe, format_description
from diffbir.checkpoints.io import CheckpointError
from diffbir.checkpoints.loading import convert
from diffbir.config import DiffusionConfig, load_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConvertConfig(BaseModel):
    """`diffbir convert`: official files -> one platform model directory."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[str]
    output: str
    schedule: Literal["v1", "v2", "v2.1"] = "v2"  # v2.1 weights: zero-terminal-SNR + v prediction
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None: keep the stored dtype
    num_head_channels: int = 64  # SD 2.1: 64; not recorded in the weights
    overwrite: bool = False


def _cmd_info(args) -> int:
    for path in args.paths:
        info = describe(path, args.num_head_channels)
        print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def _cmd_convert(args) -> int:
    cfg = load_config(
        ConvertConfig,
        args.config,
        inputs=args.inputs or None,
        output=args.output,
        schedule=args.schedule,
        dtype=args.dtype,
        num_head_channels=args.num_head_channels,
        overwrite=args.overwrite or None,
    )
    manifest = convert(
        cfg.inputs,
        cfg.output,
        diffusion=DiffusionConfig.preset(cfg.schedule),
        num_head_channels=cfg.num_head_channels,
        dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
        overwrite=cfg.overwrite,
    )
    for name, entry in manifest.parts.items():
        print(f"{name}: {entry.num_parameters:,} parameters <- {entry.source}")
    print(f"wrote {cfg.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffbir", description="DiffBIR blind image restoration")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="say what a checkpoint file or model directory is")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--num-head-channels", type=int, default=64, help="attention head width (SD 2.1: 64)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="official checkpoints -> platform model directory")
    p.add_argument("inputs", nargs="*", help="SD 2.1 / IRControlNet / SwinIR / v1 full / spandrel files")
    p.add_argument("-o", "--output", help="output directory")
    p.add_argument("--config", help="YAML file with ConvertConfig fields; flags override it")
    p.add_argument("--schedule", choices=["v1", "v2", "v2.1"], help="noise schedule of the weights (default v2)")
    p.add_argument("--dtype", choices=list(DTYPES), help="store weights in this dtype (default: as read)")
    p.add_argument("--num-head-channels", type=int, help="attention head width (default 64, SD 2.1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `diffbir info ... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValidationError, ValueError) as e:
        print(f"diffbir {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
