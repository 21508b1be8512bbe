"""`diffbir` command line: info, convert, restore and init-tiny."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from diffbir.captioning import CaptionerSettings
from diffbir.checkpoints.info import describe, format_description
from diffbir.checkpoints.io import CheckpointError
from diffbir.checkpoints.loading import convert
from diffbir.checkpoints.tiny import TINY_LAYOUT, TINY_SALT, write_keyed_files
from diffbir.config import (
    MATMUL_PRECISION_HELP,
    Arg,
    DiffusionConfig,
    Dtype,
    MatmulPrecision,
    add_config_flags,
    config_from_args,
)
from diffbir.faces import FaceConfig
from diffbir.image_io import READABLE_SUFFIXES, WRITABLE_SUFFIXES, ImageError, read_image, write_image
from diffbir.pipeline import DTYPES, RestorationPipeline, RestoreOptions
from diffbir.presets import Version

NumHeadChannels = Annotated[
    int, Field(ge=1, description="attention head width, not recorded in the weights (SD 2.1: 64)")
]


class InfoConfig(BaseModel):
    """`diffbir info`: what a checkpoint file or platform model directory holds."""

    model_config = ConfigDict(extra="forbid")
    paths: Annotated[list[str], Arg(positional=True)] = Field(
        min_length=1, description="checkpoint files and model directories"
    )
    # not `json`, which would shadow BaseModel.json
    as_json: Annotated[bool, Arg("--json")] = Field(False, description="print JSON")
    num_head_channels: NumHeadChannels = 64


class ConvertConfig(BaseModel):
    """`diffbir convert`: official files -> one platform model directory."""

    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[str], Arg(positional=True)] = Field(
        description="SD 2.1 / IRControlNet / SwinIR / v1 full / spandrel files"
    )
    output: Annotated[str, Arg("-o")] = Field(description="output directory")
    schedule: Version = Field(
        "v2",
        description="the release the weights are: its noise schedule (v2.1: zero-terminal-SNR + v prediction), "
        "recorded in model.json with the version, whose preset restorations use by default",
    )
    dtype: Dtype | None = Field(None, description="store the weights in this dtype (None: as read)")
    num_head_channels: NumHeadChannels = 64
    overwrite: bool = Field(False, description="replace an existing output directory")


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
    cfg = config_from_args(InitTinyConfig, args)
    for path in write_keyed_files(cfg.output, cfg.layout or TINY_LAYOUT, cfg.salt, cfg.overwrite):
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _cmd_info(args) -> int:
    cfg = config_from_args(InfoConfig, args)
    for path in cfg.paths:
        info = describe(path, cfg.num_head_channels)
        print(json.dumps(info, indent=2) if cfg.as_json else format_description(info))
    return 0


def _cmd_convert(args) -> int:
    cfg = config_from_args(ConvertConfig, args)
    manifest = convert(
        cfg.inputs,
        cfg.output,
        diffusion=DiffusionConfig.preset(cfg.schedule),
        version=cfg.schedule,
        num_head_channels=cfg.num_head_channels,
        dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
        overwrite=cfg.overwrite,
    )
    for name, entry in manifest.parts.items():
        print(f"{name}: {entry.num_parameters:,} parameters <- {entry.source}")
    print(f"wrote {cfg.output}")
    return 0


class RestoreConfig(CaptionerSettings, RestoreOptions):
    """`diffbir restore`: restoration options, the captioner, plus what to read, what to write and how to run."""

    inputs: Annotated[list[str], Arg(positional=True)] = Field(
        description="image files and folders (walked recursively)"
    )
    output: Annotated[str, Arg("-o")] = Field(description="output folder (input folder layout is kept)")
    model: Annotated[list[str], Arg("-m")] = Field(description="a platform model directory, or official files")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Dtype = Field("fp32", description="inference precision")
    matmul_precision: MatmulPrecision = Field("highest", description=MATMUL_PRECISION_HELP)
    batch_size: int = Field(1, ge=1, description="images restored together (padded to a common size)")
    format: Literal["same", "png", "jpg", "webp"] = Field("same", description="output format (same: the input's)")
    overwrite: bool = Field(False, description="redo outputs that exist")
    num_head_channels: NumHeadChannels = 64
    landmarks_file: str | None = Field(
        None, description="unaligned_face: a JSON file of --landmarks (one input image's faces, from your own detector)"
    )
    faces: FaceConfig = Field(default_factory=FaceConfig, description="unaligned_face: detector, parser, face model")


def collect_jobs(inputs: list[str], output: str, fmt: str) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs; folders are walked recursively and their layout kept."""
    jobs = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in READABLE_SUFFIXES and p.is_file())
            jobs += [(f, Path(output) / f.relative_to(item)) for f in files]
        elif item.is_file():
            jobs.append((item, Path(output) / item.name))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")

    def suffix(p: Path) -> str:
        if fmt != "same":
            return f".{fmt}"
        return p.suffix if p.suffix.lower() in WRITABLE_SUFFIXES else ".png"

    return [(src, dst.with_suffix(suffix(dst))) for src, dst in jobs]


def _cmd_restore(args) -> int:
    cfg = config_from_args(RestoreConfig, args)
    jobs = collect_jobs(cfg.inputs, cfg.output, cfg.format)
    todo = [(src, dst) for src, dst in jobs if cfg.overwrite or not dst.exists()]
    if len(todo) < len(jobs):
        print(f"skipping {len(jobs) - len(todo)} outputs that exist (--overwrite to redo them)")
    if not todo:
        return 0
    # only the options given: a preset (the model's version's by default) fills the others
    given = cfg.model_dump(include=set(RestoreOptions.model_fields), exclude_unset=True)
    if cfg.landmarks_file:
        try:
            given["landmarks"] = json.loads(Path(cfg.landmarks_file).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg.landmarks_file}: not JSON ({e})") from e
    if "landmarks" in given and len(todo) > 1:
        raise ValueError("landmarks are one image's faces: give one input image with --landmarks/--landmarks-file")
    opts = RestoreOptions(**given)
    pipe = RestorationPipeline.from_pretrained(
        cfg.model, cfg.device, cfg.dtype, cfg.matmul_precision, num_head_channels=cfg.num_head_channels
    )
    pipe.captioner = cfg.load_captioner(pipe.device, pipe.dtype)
    pipe.configure_faces(cfg.faces)
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
            captions = pipe.caption(images, [opts] * len(images))
            for (src, _dst), caption in zip(batch, captions):
                if caption.text:
                    tqdm.write(f"{src}: caption {caption.text!r}")
                elif caption.error:
                    tqdm.write(f"{src}: no caption ({caption.error}); the prompt alone is used", file=sys.stderr)
            for (_src, dst), out, info in zip(batch, pipe(images, opts, seeds, captions=captions), infos):
                write_image(dst, out, info)
            bar.update(len(batch))
    print(
        f"restored {len(todo) - failed} of {len(todo)} images into {cfg.output}"
        + (f"; {failed} failed" if failed else "")
    )
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffbir", description="DiffBIR blind image restoration")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, func, help_text in (
        ("info", InfoConfig, _cmd_info, "say what a checkpoint file or model directory is"),
        ("convert", ConvertConfig, _cmd_convert, "official checkpoints -> platform model directory"),
        (
            "init-tiny",
            InitTinyConfig,
            _cmd_init_tiny,
            "write tiny official-layout SD 2.1, IRControlNet and SwinIR files",
        ),
        ("restore", RestoreConfig, _cmd_restore, "restore images and folders of images"),
    ):
        p = sub.add_parser(name, help=help_text, description=cls.__doc__)
        add_config_flags(p, cls)
        p.set_defaults(func=func)
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
