"""training/promote.py against a real MLflow store, real tiny models and real photos."""

from __future__ import annotations

import json
import runpy
import sys
import tarfile
from pathlib import Path

import cv2
import pytest
from mlflow import MlflowClient
from skimage import data

from diffbir.config import build_parser
from training import registry
from training.promote import PromoteConfig, main, promote

from conftest import new_run, save_tiny

ROOT = Path(__file__).resolve().parents[1]
NAME = "diffbir-promote"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """Three real photos, cropped to multiples of 64."""
    root = tmp_path_factory.mktemp("heldout")
    for name, img in [("astronaut", data.astronaut()), ("chelsea", data.chelsea()), ("coffee", data.coffee())]:
        h, w = (s // 64 * 64 for s in img.shape[:2])
        cv2.imwrite(str(root / f"{name}.png"), cv2.cvtColor(img[:h, :w], cv2.COLOR_RGB2BGR))
    return root


def config(heldout: Path, store: Path, **fields) -> PromoteConfig:
    defaults = dict(model_name=NAME, heldout=str(heldout), tracking_dir=str(store / "store"), crop_size=64)
    return PromoteConfig(**defaults | fields)


def register(store: Path, bundle, label: str, noise: float) -> str:
    """A stage-1 model (what RM training registers) as a new version."""
    return registry.register_model(new_run(), save_tiny(store / label, bundle, noise, parts=["swinir"]), NAME)


def promotion_records(version: str) -> dict[str, dict]:
    tags = MlflowClient().get_model_version(NAME, version).tags
    return {k: json.loads(v) for k, v in tags.items() if k.startswith("promotion.")}


def test_promotion_sequence(mlflow_store, tiny_bundle, heldout, capsys):
    cfg = config(heldout, mlflow_store)
    # v1, a worse model, becomes champion because there is none yet
    assert register(mlflow_store, tiny_bundle, "bad1", 0.05) == "1"
    first = promote(cfg)
    assert (first.decision, first.reason, first.images) == ("promoted", "no champion yet", 3)
    assert registry.alias_version(NAME, "champion") == "1"
    (record,) = promotion_records("1").values()
    assert record["decision"] == "promoted" and record["candidate"]["version"] == "1" and "champion" not in record

    # v2, the reference weights, is better: promoted, through the CLI
    assert register(mlflow_store, tiny_bundle, "good2", 0.0) == "2"
    argv = [
        "--config",
        str(ROOT / "training/configs/promote.yaml"),
        "--model-name",
        NAME,
        "--heldout",
        str(heldout),
        "--tracking-dir",
        str(mlflow_store / "store"),
        "--crop-size",
        "64",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "candidate v2 vs @champion v1" in out and "decision: promoted" in out and "@champion -> v2" in out
    assert registry.alias_version(NAME, "champion") == "2"

    # v3, perturbed again, is worse: rejected, and both versions record the comparison
    assert register(mlflow_store, tiny_bundle, "bad3", 0.05) == "3"
    worse = promote(cfg)
    assert worse.decision == "rejected" and "PSNR" in worse.reason
    assert worse.scores["candidate"].psnr < worse.scores["champion"].psnr - cfg.margin_db
    assert registry.alias_version(NAME, "champion") == "2"
    (key,) = promotion_records("3")
    assert key.endswith(".v3_vs_v2")
    record = promotion_records("2")[key]
    assert record == promotion_records("3")[key]
    assert record["decision"] == "rejected" and record["margin_db"] == cfg.margin_db
    assert record["champion"] == {"version": "2", **vars(worse.scores["champion"])}
    assert record["candidate"]["psnr"] == worse.scores["candidate"].psnr and record["images"] == 3

    # v4, the same weights as the champion, is no worse: promoted
    assert register(mlflow_store, tiny_bundle, "same4", 0.0) == "4"
    equal = promote(cfg)
    assert equal.decision == "promoted" and equal.scores["candidate"] == equal.scores["champion"]
    assert registry.alias_version(NAME, "champion") == "4"

    # the champion against itself: nothing to do; history intact
    assert promote(cfg).decision == "unchanged"
    versions = MlflowClient().search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    assert all(v.current_stage == "None" for v in versions)  # aliases only, no stages
    assert [len(promotion_records(v)) for v in "1234"] == [2, 3, 1, 1]


def test_dry_run_and_shards_score_like_a_folder(mlflow_store, tiny_bundle, heldout, tmp_path):
    shard = tmp_path / "heldout-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, f in enumerate(sorted(heldout.iterdir())):
            tar.add(f, f"{i:06d}.png")
            tar.add(f, f"{i:06d}.json")  # WebDataset samples hold other members too
    version = register(mlflow_store, tiny_bundle, "dry", 0.05)
    champion = registry.alias_version(NAME, "champion")
    from_dir = promote(config(heldout, mlflow_store, candidate=int(version), dry_run=True))
    from_shard = promote(config(shard, mlflow_store, candidate=int(version), dry_run=True))
    assert from_dir.scores == from_shard.scores and from_dir.decision == "rejected"
    assert registry.alias_version(NAME, "champion") == champion and not promotion_records(version)


def test_script_runs(mlflow_store, tiny_bundle, heldout, monkeypatch, capsys):
    """`make promote` runs the file as a script (here in-process: a new interpreter costs seconds)."""
    version = register(mlflow_store, tiny_bundle, "script", 0.0)
    argv = [
        "promote.py",
        "--model-name",
        NAME,
        "--heldout",
        str(heldout),
        "--crop-size",
        "64",
        "--max-images",
        "1",
        "--tracking-dir",
        str(mlflow_store / "store"),
        "--candidate",
        version,
        "--dry-run",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "training/promote.py"), run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "1 held-out images" in out and "dry run" in out


def test_full_pipeline_scoring(mlflow_store, tiny_bundle, heldout):
    """sampling_steps > 0 scores the whole diffusion pipeline (one step of the tiny model)."""
    version = registry.register_model(new_run(), save_tiny(mlflow_store / "full", tiny_bundle), "diffbir-full")
    cfg = config(heldout, mlflow_store, model_name="diffbir-full", max_images=1, dry_run=True)
    stage1 = promote(cfg)
    sampled = promote(cfg.model_copy(update={"sampling_steps": 1}))
    assert sampled.candidate == version and sampled.decision == "promoted" and sampled.images == 1
    assert sampled.scores["candidate"] != stage1.scores["candidate"]
    assert sampled.scores["input"] == stage1.scores["input"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model-name", "nope"], "no registered model named 'nope'"),
        (["--model-name", "empty"], "registered model 'empty' has no versions"),
        (["--candidate", "99"], f"registered model '{NAME}' has no version 99"),
        (["--heldout", "/nonexistent/heldout"], "held-out set /nonexistent/heldout does not exist"),
        (["--heldout", "EMPTY"], "holds no images"),
        (["--margin-db", "-1"], "margin_db"),
        (["--sampling-steps", "1"], "restoration needs a UNet, a VAE and an IRControlNet"),
    ],
)
def test_errors_exit_nonzero(mlflow_store, heldout, tmp_path, capsys, flags, message):
    if "empty" in flags:
        MlflowClient().create_registered_model("empty")
    flags = [str(tmp_path) if f == "EMPTY" else f for f in flags]
    base = ["--model-name", NAME, "--heldout", str(heldout), "--tracking-dir", str(mlflow_store / "store")]
    assert main(base + flags) == 1
    assert message in capsys.readouterr().err


def test_every_field_is_a_flag():
    flags = {a.dest for a in build_parser(PromoteConfig)._actions} - {"help", "config"}
    assert flags == set(PromoteConfig.model_fields)
