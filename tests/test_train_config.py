"""The training configs: every shipped YAML validates, every field has a flag, flags override
the file, and the DeepSpeed JSON and the lr schedule follow the typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from diffbir.config import build_parser, load_config, parse_config
from diffbir.metrics import build_metric
from training.launch import deepspeed_config
from training.loop import ValMetrics, lr_factor
from training.train_gm import GMConfig
from training.train_rm import RMConfig

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


@pytest.mark.parametrize("name", ["rm_tiny", "rm_paper", "gm_tiny", "gm_paper", "gm_multinode"])
def test_shipped_configs_validate(name):
    cfg = load_config(GMConfig if name.startswith("gm") else RMConfig, CONFIGS / f"{name}.yaml")
    assert Path(cfg.deepspeed_config).is_file()
    if name.endswith("paper") or name.endswith("multinode"):
        global_batch = cfg.batch_size * cfg.grad_accum * cfg.num_workers
        assert global_batch == (96 if name.startswith("rm") else 256)  # the paper's batch sizes
        assert cfg.use_gpu and cfg.precision == "bf16"


def test_every_field_is_a_flag_and_flags_override_the_file(tmp_path):
    args = [
        "--config",
        str(CONFIGS / "gm_tiny.yaml"),
        "--steps",
        "7",
        "--lr-drops",
        '{"5": 1e-5}',
        "--no-gradient-checkpointing",
        "--base-weights",
        "a.ckpt",
        "b.pth",
        "--diffusion",
        '{"parameterization": "eps"}',
        "--zero-stage",
        "3",
        "--storage",
        str(tmp_path),
        "--register-as",
        "",
    ]
    cfg = parse_config(GMConfig, args)
    assert (cfg.steps, cfg.lr_drops, cfg.gradient_checkpointing, cfg.zero_stage, cfg.register_as) == (
        7,
        {5: 1e-5},
        False,
        3,
        "",
    )
    assert cfg.base_weights == [str(Path("a.ckpt").resolve()), str(Path("b.pth").resolve())]  # made absolute
    assert cfg.diffusion.parameterization == "eps" and cfg.text_encoder.width == 48  # the rest from the file
    flags = {a.dest: a.option_strings for a in build_parser(GMConfig)._actions}
    assert all(flags[f][0] == "--" + f.replace("_", "-") for f in GMConfig.model_fields)


def test_paired_data_flags_reach_the_feed(tmp_path):
    """--data HQ --lq-data LQ --lq-scale 4: the training samples are the pairs of the two folders
    (x4), validation defaults to them too; a crop the scale does not divide is refused."""
    for side, size in (("hq", 64), ("lq", 16)):
        (tmp_path / side).mkdir()
        Image.new("RGB", (size, size), "gray").save(tmp_path / side / "a.png")
    args = ["--config", str(CONFIGS / "rm_tiny.yaml"), "--data", str(tmp_path / "hq"), "--lq-data"]
    cfg = parse_config(RMConfig, [*args, str(tmp_path / "lq"), "--lq-scale", "4"])
    assert (cfg.feed().lq_data, cfg.feed().lq_scale) == (str(tmp_path / "lq"), 4)
    assert cfg.index()["lq_url"].to_pylist()[0].endswith("/lq/a.png")
    cfg = cfg.model_copy(update={"val_data": None})  # rm_tiny.yaml's held-out shards
    assert cfg.val_index()["lq_url"].to_pylist() == cfg.index()["lq_url"].to_pylist()
    with pytest.raises(ValidationError, match="crop_size 64 must be a multiple of lq_scale 3"):
        parse_config(RMConfig, [*args, str(tmp_path / "lq"), "--lq-scale", "3"])


def test_deepspeed_config_and_lr_schedule():
    cfg = load_config(
        RMConfig,
        CONFIGS / "rm_paper.yaml",
        grad_accum=2,
        grad_clip=1.0,
        zero_stage=3,
        precision="fp32",
        warmup_steps=10,
        lr_drops={100: 1e-5},
    )
    ds = deepspeed_config(cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (
        12,
        2,
        1.0,
    )
    assert (
        ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"]
    )  # the JSON's own settings stay
    assert not ds["bf16"]["enabled"] and ds["optimizer"]["params"]["lr"] == 1e-4
    assert [cfg.lr * lr_factor(cfg, s) for s in (0, 9, 99, 100)] == pytest.approx([1e-5, 1e-4, 1e-4, 1e-5])


def test_val_metrics_are_diffbir_metrics_checked_at_config_time():
    """Validation logs val/<metric> through diffbir.metrics, as promotion scores; a typo fails on reading."""
    cfg = load_config(RMConfig, CONFIGS / "rm_tiny.yaml")
    assert cfg.val_metrics.names == ["psnr", "ssim"]  # the cheap ones by default
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        load_config(RMConfig, CONFIGS / "rm_tiny.yaml", val_metrics={"names": ["psnr", "nope"]})
    gen = torch.Generator().manual_seed(0)
    hq = torch.rand(2, 3, 32, 32, generator=gen)
    lq = (hq + 0.1 * torch.randn(hq.shape, generator=gen)).clamp(0, 1)
    scores = ValMetrics(cfg.val_metrics, torch.device("cpu"))(lq, hq, "_lq")
    expected = {f"val/{k}_lq": build_metric(k)(lq, hq).mean().item() for k in ("psnr", "ssim")}
    assert scores == pytest.approx(expected, rel=1e-12)
