"""training/promote.py against a real MLflow store, real tiny models and real photos."""

from __future__ import annotations

import json
import math
import runpy
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import pytest
from mlflow import MlflowClient
from skimage import data

from diffbir.config import build_parser, load_config
from training import promote as promote_module
from training import registry
from training.promote import Gate, PromoteConfig, Promotion, PromotionError, judge, main, promote

from conftest import new_run, save_tiny

ROOT = Path(__file__).resolve().parents[1]
NAME = "diffbir-promote"
PROMOTE_YAML = ROOT / "training/configs/promote.yaml"


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


def register(store: Path, bundle, label: str, noise: float, name: str = NAME) -> str:
    """A stage-1 model (what RM training registers) as a new version."""
    return registry.register_model(new_run(), save_tiny(store / label, bundle, noise, parts=["swinir"]), name)


def promotion_records(version: str, name: str = NAME) -> dict[str, dict]:
    tags = MlflowClient().get_model_version(name, version).tags
    return {k: json.loads(v) for k, v in tags.items() if k.startswith("promotion.")}


def row(record: dict, metric: str) -> dict:
    """The comparison table's row of `metric` in a promotion record."""
    (found,) = [r for r in record["table"] if r["metric"] == metric]
    return found


def test_promotion_sequence(mlflow_store, tiny_bundle, heldout, capsys):
    cfg = config(heldout, mlflow_store)
    # v1, a worse model, becomes champion because there is none yet
    assert register(mlflow_store, tiny_bundle, "bad1", 0.05) == "1"
    first = promote(cfg)
    assert (first.decision, first.reason, first.images) == ("promoted", "no champion yet", 3)
    assert registry.alias_version(NAME, "champion") == "1"
    (record,) = promotion_records("1").values()
    assert record["decision"] == "promoted" and record["candidate"] == "1" and record["champion"] is None
    assert [r["metric"] for r in record["table"]] == ["psnr", "ssim"] and "champion" not in row(record, "psnr")

    # v2, the reference weights, is better: promoted, through the CLI (the shipped file's gates, less its
    # PSNR limit: the tiny reference weights are random, ~9 dB)
    assert register(mlflow_store, tiny_bundle, "good2", 0.0) == "2"
    argv = [
        "--config",
        str(PROMOTE_YAML),
        "--model-name",
        NAME,
        "--heldout",
        str(heldout),
        "--tracking-dir",
        str(mlflow_store / "store"),
        "--crop-size",
        "64",
        "--gates",
        json.dumps(
            [g.model_dump() | {"limit": None} for g in load_config(PromoteConfig, PROMOTE_YAML, heldout="h").gates]
        ),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "candidate v2 vs @champion v1" in out and "decision: promoted" in out and "@champion -> v2" in out
    assert registry.alias_version(NAME, "champion") == "2"

    # v3, perturbed again, is worse: rejected, and both versions record the comparison
    assert register(mlflow_store, tiny_bundle, "bad3", 0.05) == "3"
    worse = promote(cfg)
    assert worse.decision == "rejected" and "psnr" in worse.reason
    assert worse.scores["candidate"]["psnr"] < worse.scores["champion"]["psnr"] - cfg.gates[0].margin
    assert registry.alias_version(NAME, "champion") == "2"
    (key,) = promotion_records("3")
    assert key.endswith(".v3_vs_v2")
    record = promotion_records("2")[key]
    assert record == promotion_records("3")[key]
    assert record["decision"] == "rejected" and (record["candidate"], record["champion"]) == ("3", "2")
    assert record["table"] == [v.record() for v in worse.table] and record["images"] == 3
    psnr = row(record, "psnr")
    assert (psnr["margin"], psnr["better"], psnr["verdict"]) == (cfg.gates[0].margin, "higher", "fail")
    assert (psnr["champion"], psnr["candidate"]) == (
        worse.scores["champion"]["psnr"],
        worse.scores["candidate"]["psnr"],
    )

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
        (["--gates", '[{"metric": "psnr", "margin": -1}]'], "margin"),
        (["--gates", '[{"metric": "nope"}]'], "unknown metric 'nope'"),
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
    flags = {a.dest for a in build_parser(PromoteConfig)._actions if "." not in a.dest} - {"help", "config"}
    assert flags == set(PromoteConfig.model_fields)


def test_nan_candidate_is_rejected_without_a_champion(mlflow_store, tiny_bundle, heldout):
    """A diverged model (NaN SwinIR weights) restores NaN pixels: no metric is defined, no promotion."""
    name = "diffbir-nan"
    version = register(mlflow_store, tiny_bundle, "nan", math.nan, name)
    result = promote(config(heldout, mlflow_store, model_name=name))
    assert (result.decision, result.champion) == ("rejected", None) and "psnr is nan: not a score" in result.reason
    assert all(math.isnan(v) for v in result.scores["candidate"].values())
    assert registry.alias_version(name, "champion") is None
    (record,) = promotion_records(version, name).values()  # strict JSON: NaN written as a string
    assert record["decision"] == "rejected" and row(record, "ssim")["candidate"] == "nan"
    assert row(record, "ssim")["verdict"] == "fail" and math.isfinite(row(record, "ssim")["input"])


def test_under_limit_candidate_is_rejected_without_a_champion(mlflow_store, tiny_bundle, heldout):
    name = "diffbir-limit"
    register(mlflow_store, tiny_bundle, "limit", 0.0, name)
    psnr = promote(config(heldout, mlflow_store, model_name=name, dry_run=True)).scores["candidate"]["psnr"]
    under = promote(config(heldout, mlflow_store, model_name=name, gates=[{"metric": "psnr", "limit": psnr + 0.5}]))
    assert under.decision == "rejected" and f"beyond the limit >= {psnr + 0.5}" in under.reason
    assert registry.alias_version(name, "champion") is None
    over = promote(config(heldout, mlflow_store, model_name=name, gates=[{"metric": "psnr", "limit": psnr - 0.5}]))
    assert (over.decision, over.reason) == ("promoted", "no champion yet")


def test_margins_decide_and_both_versions_hold_the_table(mlflow_store, tiny_bundle, heldout, capsys):
    name = "diffbir-margin"
    champion = register(mlflow_store, tiny_bundle, "margin1", 0.0, name)
    assert promote(config(heldout, mlflow_store, model_name=name)).decision == "promoted"
    candidate = register(mlflow_store, tiny_bundle, "margin2", 0.01, name)  # slightly perturbed: a little worse
    measured = promote(config(heldout, mlflow_store, model_name=name, dry_run=True)).scores
    loss = measured["champion"]["psnr"] - measured["candidate"]["psnr"]
    assert loss > 0

    def gates(psnr_margin: float) -> list[dict]:
        return [{"metric": "psnr", "margin": psnr_margin}, {"metric": "ssim", "margin": 1.0}]

    beyond = promote(config(heldout, mlflow_store, model_name=name, gates=gates(loss / 2)))
    assert beyond.decision == "rejected" and registry.alias_version(name, "champion") == champion
    assert beyond.reason.startswith(f"psnr {measured['candidate']['psnr']:.4f} vs v{champion}'s ")
    assert beyond.reason.endswith(f"({-loss:+.4f}): worse by more than the margin {loss / 2}")
    within = promote(config(heldout, mlflow_store, model_name=name, gates=gates(2 * loss)))
    assert within.decision == "promoted" and registry.alias_version(name, "champion") == candidate
    assert within.scores == beyond.scores == measured  # the same inputs, the same numbers

    records = [promotion_records(v, name) for v in (champion, candidate)]
    assert records[0].keys() > records[1].keys() and len(records[1]) == 2  # v1 also holds its own first promotion
    for key, record in records[1].items():
        assert records[0][key] == record
        verdicts = {r["metric"]: r["verdict"] for r in record["table"]}
        assert verdicts == (
            {"psnr": "fail", "ssim": "pass"} if record["decision"] == "rejected" else {"psnr": "pass", "ssim": "pass"}
        )
    capsys.readouterr()


@pytest.mark.parametrize(
    "lower_is_better, cand, champ, gate, passed, reason",
    [
        # non-finite means: NaN and infinitely bad values reject; +inf PSNR (exact restorations) stands
        (False, math.nan, None, {}, False, "x is nan: not a score"),
        (False, -math.inf, None, {}, False, "x is -inf: not a score"),
        (True, math.inf, None, {}, False, "x is inf: not a score"),
        (False, math.inf, None, {"limit": 20.0}, True, "x inf, within the limit 20.0; no champion to compare with"),
        (False, math.inf, math.inf, {"margin": 0.1}, True, "x inf vs v1's inf (+nan): within the margin 0.1"),
        (
            False,
            30.0,
            math.inf,
            {"margin": 0.1},
            False,
            "x 30.0000 vs v1's inf (-inf): worse by more than the margin 0.1",
        ),
        (
            False,
            30.0,
            math.nan,
            {"margin": 0.1},
            True,
            "x 30.0000 vs v1's nan (+nan): within the margin 0.1",
        ),  # a broken champion
        # a lower-is-better metric (LPIPS-like): the limit is a ceiling, the margin an allowed rise
        (True, 0.5, None, {"limit": 0.4}, False, "x 0.5000 is beyond the limit <= 0.4"),
        (
            True,
            0.32,
            0.30,
            {"margin": 0.01},
            False,
            "x 0.3200 vs v1's 0.3000 (+0.0200): worse by more than the margin 0.01",
        ),
        (True, 0.32, 0.30, {"margin": 0.03}, True, "x 0.3200 vs v1's 0.3000 (+0.0200): within the margin 0.03"),
        (True, 0.20, 0.30, {"limit": 0.4}, True, "x 0.2000 vs v1's 0.3000 (-0.1000): within the margin 0.0"),
        (False, 5.0, None, None, True, "x measured, not gated"),
    ],
)
def test_judge(lower_is_better, cand, champ, gate, passed, reason):
    gate = None if gate is None else Gate(metric="psnr", **gate)
    assert judge("x", lower_is_better, cand, champ, gate, None if champ is None else "1") == (passed, reason)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        PromoteConfig(heldout="h", gates=[{"metric": "nope", "margin": 0.01}])
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        PromoteConfig(heldout="h", metrics={"names": ["psnr", "nope"]})
    with pytest.raises(ValueError, match="one gate per metric: psnr has several"):
        PromoteConfig(heldout="h", gates=[{"metric": "psnr"}, {"metric": "psnr", "margin": 1}])
    with pytest.raises(ValueError, match="at least 1 item"):
        PromoteConfig(heldout="h", gates=[])
    cfg = PromoteConfig(heldout="h", gates=[{"metric": "ssim", "limit": 0.5}], metrics={"names": ["psnr", "ssim"]})
    assert cfg.measured() == ["ssim", "psnr"]  # gated first, then reported only


def test_concurrent_promotions_cannot_lose_an_update(mlflow_store, tiny_bundle, heldout, monkeypatch):
    """Two promotions scored against the same champion: the alias moves once, to the first to move;
    the second finds the alias no longer naming the champion it compared against, and says so."""
    name = "diffbir-race"
    champion = register(mlflow_store, tiny_bundle, "race1", 0.05, name)
    registry.set_alias(name, "champion", champion)
    candidates = [register(mlflow_store, tiny_bundle, f"race{i}", 0.0, name) for i in (2, 3)]

    both_scored = threading.Barrier(2, timeout=60)
    score = promote_module.heldout_means
    monkeypatch.setattr(promote_module, "heldout_means", lambda *a: (score(*a), both_scored.wait())[0])
    set_alias = MlflowClient.set_registered_model_alias  # slow: both promotions reach the move before either ends it
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", lambda *a: (time.sleep(0.5), set_alias(*a)))

    def run(candidate: str):
        try:
            return promote(config(heldout, mlflow_store, model_name=name, candidate=int(candidate)))
        except PromotionError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        outcomes = dict(zip(candidates, pool.map(run, candidates)))
    promoted = [c for c, o in outcomes.items() if isinstance(o, Promotion)]
    assert len(promoted) == 1, outcomes
    (winner,), (loser,) = promoted, set(candidates) - set(promoted)
    assert outcomes[winner].decision == "promoted" and outcomes[winner].champion == champion
    assert registry.alias_version(name, "champion") == winner
    message = str(outcomes[loser])
    assert f"v{loser} was compared against v{champion}, but @champion of '{name}' now names v{winner}" in message
    assert not promotion_records(loser, name)  # the loser wrote nothing
