"""`diffbir` command line: info, convert, restore and init-tiny."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from diffbir.checkpoints.info import describe, format_description
from diffbir.checkpoints.io import CheckpointError
from diffbir.checkpoints.loading import convert
from diffbir.checkpoints.tiny import TINY_LAYOUT, TINY_SALT, write_keyed_files
from diffbir.config import DiffusionConfig, add_config_flags, load_config
from diffbir.image_io import ImageError, read_image, write_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions

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


class InitTinyConfig(BaseModel):
    """`diffbir init-tiny`: a tiny SD 2.1 single file, IRControlNet file and SwinIR file in the
    official layouts, made by the key-based initialisation (the demo's and examples' models)."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field("runs/tiny", description="folder to write the three files into")
    layout: str | None = Field(
        None, description="weights manifest listing each file's keys and shapes (None: the embedded tiny model)"
    )
    salt: int = Field(
        TINY_SALT, ge=0, description="salt of the key-based initialisation (1: the reference's tiny files)"
    )
    overwrite: bool = Field(False, description="rewrite files that exist")


def _cmd_init_tiny(args) -> int:
    cfg = load_config(InitTinyConfig, args.config, **{f: getattr(args, f) for f in InitTinyConfig.model_fields})
    for path in write_keyed_files(cfg.output, cfg.layout or TINY_LAYOUT, cfg.salt, cfg.overwrite):
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


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


class RestoreConfig(RestoreOptions):
    """`diffbir restore`: restoration options plus what to read, what to write and how to run."""

    inputs: list[str]
    output: str
    model: list[str]  # a platform model directory, or official files
    device: str = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = Field(1, ge=1)
    format: Literal["same", "png", "jpg", "webp"] = "same"
    overwrite: bool = False
    num_head_channels: int = 64


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def collect_jobs(inputs: list[str], output: str, fmt: str) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs; folders are walked recursively and their layout kept."""
    jobs = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            jobs += [(f, Path(output) / f.relative_to(item)) for f in files]
        elif item.is_file():
            jobs.append((item, Path(output) / item.name))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")

    def suffix(p: Path) -> str:
        if fmt != "same":
            return f".{fmt}"
        return p.suffix if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") else ".png"

    return [(src, dst.with_suffix(suffix(dst))) for src, dst in jobs]


def _cmd_restore(args) -> int:
    overrides = {f: getattr(args, f) for f in RestoreConfig.model_fields if getattr(args, f, None) is not None}
    cfg = load_config(RestoreConfig, args.config, **overrides)
    jobs = collect_jobs(cfg.inputs, cfg.output, cfg.format)
    todo = [(src, dst) for src, dst in jobs if cfg.overwrite or not dst.exists()]
    if len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} outputs that exist (--overwrite to redo them)")
    if not todo:
        return 0
    pipe = RestorationPipeline.from_pretrained(
        cfg.model, cfg.device, cfg.dtype, num_head_channels=cfg.num_head_channels
    )
    opts = RestoreOptions(**cfg.model_dump(include=set(RestoreOptions.model_fields)))
    failed = 0
    with tqdm(total=len(todo), unit="img", desc="restore") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch, images, infos = [], [], []
            for src, dst in todo[start : start + cfg.batch_size]:
                try:
                    img, info = read_image(src)
                except ImageError as e:
                    tqdm.write(f"skip {e}", file=sys.stderr)
                    failed += 1
                    bar.update()
                    continue
                batch.append((src, dst))
                images.append(img)
                infos.append(info)
            if not batch:
                continue
            seeds = [cfg.seed + start + i for i in range(len(batch))]
            for (_src, dst), out, info in zip(batch, pipe(images, opts, seeds), infos):
                write_image(dst, out, info)
            bar.update(len(batch))
    print(
        f"restored {len(todo) - failed} of {len(todo)} images into {cfg.output}"
        + (f"; {failed} failed" if failed else "")
    )
    return 1 if failed else 0


def _add_restore_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="image files and folders (walked recursively)")
    p.add_argument("-o", "--output", help="output folder (input folder layout is kept)")
    p.add_argument("-m", "--model", action="append", help="platform model dir, or official files (repeat)")
    p.add_argument("--config", help="YAML file with RestoreConfig fields; flags override it")
    for name, field in RestoreConfig.model_fields.items():
        if name in ("inputs", "output", "model"):
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool or field.annotation == (bool | None):
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {int: int, float: float}.get(field.annotation, None)
            if kind is None and field.annotation == (float | None):
                kind = float
            p.add_argument(flag, dest=name, type=kind or str, help=f"{help_text} (default: {field.default})".strip())


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

    p = sub.add_parser("init-tiny", help="write tiny official-layout SD 2.1, IRControlNet and SwinIR files")
    add_config_flags(p, InitTinyConfig)
    p.set_defaults(func=_cmd_init_tiny)

    p = sub.add_parser("restore", help="restore images and folders of images")
    _add_restore_flags(p)
    p.set_defaults(func=_cmd_restore)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `diffbir info ... | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CheckpointError, FileExistsError, FileNotFoundError, ValidationError, ValueError) as e:
        print(f"diffbir {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
