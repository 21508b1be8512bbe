"""diffbir.config, the one way every command is built: --config YAML, then one flag per field
(Literal choices, nested sections, positional fields and short aliases); and every command of
the platform takes each of its config's fields, and parses the command lines the docs record."""

from __future__ import annotations

import argparse
import re
import shlex
import typing
from typing import Annotated, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffbir import cli
from diffbir.config import Arg, build_parser, config_from_args, load_config, parse_config

from conftest import ROOT, infra_demo, script_module


class Inner(BaseModel):
    """The innermost section."""

    model_config = ConfigDict(extra="forbid")
    depth: int = 1


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(8, description="a size")
    mode: Literal["fast", "exact"] = "fast"
    on: bool = True
    inner: Inner = Field(default_factory=Inner)


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: Annotated[list[str], Arg(positional=True)] = Field(description="input files")
    output: Annotated[str, Arg("-o")] = "out"
    models: Annotated[list[str], Arg("-m")] = []
    precision: Literal["fp32", "bf16"] = Field("fp32", description="how precise")
    section: Section = Field(default_factory=Section)
    optional: Section | None = None


def test_literal_fields_list_and_enforce_their_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser(Command).parse_args(["--help"])
    assert "--precision {fp32,bf16}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        parse_config(Command, ["a", "--precision", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
    assert parse_config(Command, ["a", "--section.mode", "exact"]).section.mode == "exact"
    with pytest.raises(SystemExit):
        parse_config(Command, ["a", "--section.mode", "slow"])


def test_nested_sections_field_by_field_or_whole(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"inputs": ["x"], "section": {"size": 3, "mode": "exact"}}))
    cfg = parse_config(Command, ["--config", str(file), "--section.inner.depth", "4", "--no-section.on"])
    assert cfg.section == Section(size=3, mode="exact", on=False, inner=Inner(depth=4))  # the YAML's fields stay
    cfg = parse_config(Command, ["--config", str(file), "--section", '{"size": 5}', "--section.inner.depth", "2"])
    assert cfg.section == Section(size=5, inner=Inner(depth=2))  # JSON replaces the section, dotted flags refine it
    assert parse_config(Command, ["x", "--optional", '{"size": 2}']).optional.size == 2  # optional: JSON only
    assert "--optional.size" not in build_parser(Command).format_help()
    assert load_config(Command, file, **{"section.size": 9}).section.mode == "exact"
    with pytest.raises(ValidationError, match="nope"):
        parse_config(Command, ["x", "--section", '{"nope": 1}'])


def test_positional_fields_and_aliases(tmp_path):
    cfg = parse_config(Command, ["a", "b", "-o", "dir", "-m", "m1", "-m", "m2", "m3"])
    assert (cfg.inputs, cfg.output, cfg.models) == (["a", "b"], "dir", ["m1", "m2", "m3"])  # repeating adds
    assert parse_config(Command, ["a", "--output", "d2"]).output == "d2"
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"inputs": ["from-yaml"]}))
    assert parse_config(Command, ["--config", str(file)]).inputs == ["from-yaml"]  # absent positional: the YAML's
    assert parse_config(Command, ["--config", str(file), "c"]).inputs == ["c"]
    with pytest.raises(ValidationError, match="inputs"):
        parse_config(Command, [])


def test_config_from_args_of_a_subcommand():
    args = cli.build_parser().parse_args(["convert", "a.ckpt", "b.pth", "-o", "out", "--dtype", "bf16"])
    cfg = config_from_args(cli.ConvertConfig, args)  # the namespace also holds `command` and `func`
    assert (cfg.inputs, cfg.output, cfg.dtype, cfg.schedule) == (["a.ckpt", "b.pth"], "out", "bf16", "v2")


# --------------------------------------------------------------------------- every entry point


def _benchmark(name: str):
    return script_module(f"benchmarks/{name}.py").BenchConfig


def _entry_points() -> dict[str, tuple]:
    """command -> (its parser, its config class); the diffbir subcommands share one parser."""
    from pipelines.feed import ExampleDataConfig
    from pipelines.filter_laion import FilterLaionConfig
    from serving.archive import ArchiveConfig
    from serving.config import ServeConfig
    from training.evaluate import EvalConfig
    from training.promote import PromoteConfig
    from training.train_gm import GMConfig
    from training.train_rm import RMConfig

    own = {
        "python -m pipelines.filter_laion": FilterLaionConfig,
        "python -m pipelines.feed": ExampleDataConfig,
        "python -m serving.app": ServeConfig,
        "python -m serving.archive": ArchiveConfig,
        "python training/train_rm.py": RMConfig,
        "python training/train_gm.py": GMConfig,
        "python training/promote.py": PromoteConfig,
        "python -m training.evaluate": EvalConfig,
        "python infra/demo.py": infra_demo().DemoConfig,
        "python tests/golden/refresh.py": script_module("tests/golden/refresh.py").RefreshConfig,
    }
    own |= {f"python benchmarks/{p.name}": _benchmark(p.stem) for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    diffbir = cli.build_parser()
    subcommands = {
        "info": cli.InfoConfig,
        "convert": cli.ConvertConfig,
        "init-tiny": cli.InitTinyConfig,
        "restore": cli.RestoreConfig,
    }
    return {f"diffbir {k}": (diffbir, cls) for k, cls in subcommands.items()} | {
        k: (build_parser(cls), cls) for k, cls in own.items()
    }


def _arguments(cls: type[BaseModel], prefix: str = "") -> set[str]:
    """Every dest a parser of `cls` must have: each field, and each field of a nested section."""
    dests = set()
    for name, field in cls.model_fields.items():
        dests.add(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            dests |= _arguments(field.annotation, f"{prefix}{name}.")
    return dests


def _actions(parser: argparse.ArgumentParser, command: str) -> list[argparse.Action]:
    if command.startswith("diffbir "):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command.split()[1]]
    return parser._actions


@pytest.fixture(scope="module")
def entry_points():
    return _entry_points()


def test_every_entry_point_takes_every_field_of_its_config(entry_points):
    assert {"diffbir restore", "python -m pipelines.filter_laion", "python -m pipelines.feed"} <= set(entry_points)
    scripts = {f"python benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}
    assert scripts and scripts <= set(entry_points)  # every benchmark script is an entry point here
    for command, (parser, cls) in entry_points.items():
        actions = {a.dest: a for a in _actions(parser, command)}
        assert set(actions) - {"help"} == _arguments(cls) | {"config"}, command
        for name, field in cls.model_fields.items():
            if typing.get_origin(field.annotation) is Literal:
                assert tuple(actions[name].choices) == typing.get_args(field.annotation), f"{command} --{name}"


def test_filter_laion_help_shows_every_stage_field(capsys):
    from pipelines import filter_laion

    with pytest.raises(SystemExit):
        filter_laion.main(["--help"])
    shown = capsys.readouterr().out
    for section in ("sample", "prefilter", "download", "quality", "dedup", "shards"):
        fields = filter_laion.FilterLaionConfig.model_fields[section].annotation.model_fields
        assert all(f"--{section}.{f.replace('_', '-')}" in shown for f in fields), section


# Commands as README.md and benchmarks/RESULTS.md show them: inline or fenced, continuations joined
COMMAND = re.compile(r"(?:^|[\s`(])(?:\.venv/bin/)?((?:python3?|diffbir) [^`\n)]*)")


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in ("README.md", "benchmarks/RESULTS.md"):
        text = (ROOT / doc).read_text().replace("\\\n", " ")
        for match in COMMAND.finditer(text):
            command = match.group(1)
            if "..." not in command and not re.match(r"python3? (-c|-) ", command):  # elided, or inline code
                found.append((doc, command))
    return found


def test_documented_commands_parse(entry_points):
    commands = documented_commands()
    assert len(commands) > 20
    for doc, command in commands:
        tokens = shlex.split(command, comments=True)
        tokens[0] = re.sub(r"^python3?$", "python", tokens[0])
        key = next((k for k in entry_points if tokens[: len(k.split())] == k.split()), None)
        assert key, f"{doc}: {command!r} runs no entry point this test knows"
        parser, _ = entry_points[key]
        args = tokens[len(key.split()) - 1 :] if key.startswith("diffbir ") else tokens[len(key.split()) :]
        try:
            parser.parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"{doc}: {command!r} does not parse"
