"""training/evaluate.py: the tiny reference model scored on a synthetic benchmark of real photos
through a real local Ray and a real MLflow store: every output checked, a rerun that redoes
nothing and makes the same LQ inputs, a run interrupted part-way then resumed, and the refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from pydantic import ValidationError
from skimage import data

from diffbir.config import load_config
from diffbir.image_io import decode_image, encode_image
from diffbir.metrics import FID, MetricsConfig, psnr, random_weights, ssim
from pipelines.degradations import degrade, load_degradation
from training import evaluate as ev
from training import registry
from training.evaluate import EvalConfig, EvalError, degradation_seed

from conftest import new_run, save_tiny

TINY_YAML = Path(ev.__file__).parent / "configs" / "eval_tiny.yaml"
# 64x64 crops of real photos (one in a subfolder: folders are read recursively)
PHOTOS = {"astronaut.png": data.astronaut, "coffee.png": data.coffee, "cats/chelsea.png": data.chelsea}
SETTINGS = [dict(name="s0", options=dict(guidance_scale=0.0)), dict(name="s0.5", options=dict(guidance_scale=0.5))]
METRICS = ("psnr", "ssim")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_bundle) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", tiny_bundle)


@pytest.fixture(scope="module")
def hq_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hq")
    for name, load in PHOTOS.items():
        img = load()
        y, x = img.shape[0] // 2 - 32, img.shape[1] // 2 - 32
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode_image(img[y : y + 64, x : x + 64] / 255.0))
    return root


@pytest.fixture(scope="module")
def blurred_dir(tmp_path_factory, hq_dir) -> Path:
    """ "Another method": the HQ crops blurred, as JPEG (matched by name without suffix)."""
    root = tmp_path_factory.mktemp("blur")
    for name in PHOTOS:
        hq = cv2.imread(str(hq_dir / name))
        target = (root / name).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.GaussianBlur(hq, (5, 5), 1.5), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return root


@pytest.fixture(scope="module")
def fid_reference(tmp_path_factory) -> Path:
    """FID's reference set: four 64x64 crops of two other photos."""
    root = tmp_path_factory.mktemp("reference")
    for name in ("rocket", "hubble_deep_field"):
        img = getattr(data, name)()
        for y, x in ((100, 100), (200, 260)):
            (root / f"{name}_{y}_{x}.png").write_bytes(encode_image(img[y : y + 64, x : x + 64] / 255.0))
    return root


def config(out: Path, models: list[str], hq: Path, **overrides) -> EvalConfig:
    """The shipped tiny config on the test's folders."""
    fields = dict(
        models=models,
        benchmarks=[dict(name="photos", hq=str(hq), degradation="realesrgan", seed=7, crop=64)],
        settings=SETTINGS,
        output=str(out),
        grid_images=2,
        batch_size=2,
    )
    return load_config(EvalConfig, TINY_YAML, **fields | overrides)


def rgb(path: Path) -> np.ndarray:
    return decode_image(path.read_bytes(), str(path), dtype=np.uint8)[0]


def test_evaluate_a_registry_version_with_a_compared_method(tmp_path, mlflow_store, model_dir, hq_dir, blurred_dir):
    version = registry.register_model(new_run(), model_dir, "diffbir")
    registry.set_alias("diffbir", "champion", version)
    out, label = tmp_path / "eval", f"diffbir-v{version}"
    cfg = config(out, ["models:/diffbir@champion"], hq_dir, compare=[f"blur={blurred_dir}"])
    summary = ev.evaluate(cfg)
    n = len(PHOTOS)
    assert summary["models"] == [f"models:/diffbir/{version}"]  # the alias, pinned
    assert (summary["restored_this_run"], summary["prepared_this_run"]) == (n * len(SETTINGS), n)
    assert summary["rows"] == summary["scored_rows_this_run"] == n * (len(SETTINGS) + 1) * len(METRICS)

    # the synthetic inputs: HQ crops and their LQ, degraded with the seed of each image's name
    degradation = load_degradation("realesrgan").model_copy(update={"usm_sharpen": False})  # benchmarks: no GT USM
    stems = {name: name.removesuffix(".png") for name in PHOTOS}
    for name, stem in stems.items():
        hq = rgb(out / "inputs" / "photos" / "hq" / f"{stem}.png")
        assert np.array_equal(hq, rgb(hq_dir / name))  # 64x64 already: the crop keeps it
        expected, _ = degrade(hq, np.random.default_rng(degradation_seed(name, 7)), degradation)
        assert np.array_equal(rgb(out / "inputs" / "photos" / "lq" / f"{stem}.png"), expected)

    # per_image.parquet: every (setting or method, image, metric), each value the metric of the files
    per_image = pq.read_table(out / "per_image.parquet").to_pandas()
    assert list(per_image.columns) == ["benchmark", "model", "setting", "image", "metric", "value"]
    assert len(per_image) == n * (len(SETTINGS) + 1) * len(METRICS)
    columns = [(label, "s0"), (label, "s0.5"), ("blur", "-")]
    assert list(dict.fromkeys(zip(per_image["model"], per_image["setting"]))) == columns
    assert set(per_image["image"]) == set(PHOTOS) and set(per_image["benchmark"]) == {"photos"}
    for row in per_image.itertuples():
        stem = stems[row.image]
        hq = rgb(out / "inputs" / "photos" / "hq" / f"{stem}.png")
        if row.model == "blur":
            pred = rgb((blurred_dir / stem).with_suffix(".jpg"))
        else:
            pred = rgb(out / "images" / "photos" / label / row.setting / f"{stem}.png")
        assert row.value == pytest.approx({"psnr": psnr, "ssim": ssim}[row.metric](pred, hq), abs=1e-9)

    # metrics.csv: the per-image means, population std and counts
    csv = pd.read_csv(out / "metrics.csv", keep_default_na=False)
    assert list(csv.columns) == ["benchmark", "model", "setting", "metric", "mean", "std", "n"]
    assert len(csv) == len(columns) * len(METRICS) and set(csv["n"]) == {n}
    for row in csv.itertuples():
        values = per_image[
            (per_image.model == row.model) & (per_image.setting == row.setting) & (per_image.metric == row.metric)
        ]["value"]
        assert row.mean == pytest.approx(values.mean()) and row.std == pytest.approx(np.std(values))

    # table.md: a row per metric with its direction, a column per model/setting and method, best in bold
    table = (out / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == f"| metric | {label} (s0) | {label} (s0.5) | blur |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| PSNR ↑", "| SSIM ↑"]
    assert "## photos" in table and "realesrgan, seed 7" in table
    for metric, line in zip(METRICS, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        means = [csv[(csv.model == m) & (csv.setting == s) & (csv.metric == metric)]["mean"].item() for m, s in columns]
        best = int(np.argmax(means))
        assert [c.startswith("**") for c in cells] == [i == best for i in range(len(columns))], (metric, cells)
        assert float(cells[best].strip("*")) == pytest.approx(means[best], abs=0.01)

    # the sample grid: LQ | stage 1 | two settings | blur | HQ, two rows of GRID_THUMB
    grid = cv2.imread(str(out / "grid_photos.png"))
    assert grid.shape[0] == ev.GRID_HEADER + 2 * (ev.GRID_THUMB + ev.GRID_PAD)
    assert grid.shape[1] >= 6 * ev.GRID_THUMB + 7 * ev.GRID_PAD
    stage1 = sorted(p.name for p in (out / "images").rglob("*.stage1.png"))
    assert stage1 == ["astronaut.stage1.png", "chelsea.stage1.png"]  # the grid's rows, first model and setting

    # the MLflow run: the reports as artifacts, the means as metrics; the version's tags
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert artifacts == {"per_image.parquet", "metrics.csv", "table.md", "grid_photos.png", "config.yaml"}
    tags = client.get_model_version("diffbir", version).tags
    assert tags["eval.run_id"] == summary["run_id"]
    for row in csv.itertuples():
        assert run.data.metrics[f"photos.{row.model}.{row.setting}.{row.metric}"] == pytest.approx(row.mean)
        if row.model == label:
            assert float(tags[f"eval.photos.{row.setting}.{row.metric}"]) == pytest.approx(row.mean)

    # a rerun: nothing restored or scored again; LQ inputs made afresh are the same bytes
    lq = {p.name: p.read_bytes() for p in (out / "inputs" / "photos" / "lq").rglob("*.png")}
    shutil.rmtree(out / "inputs")
    again = ev.evaluate(cfg)
    assert (again["restored_this_run"], again["scored_rows_this_run"], again["prepared_this_run"]) == (0, 0, n)
    assert {p.name: p.read_bytes() for p in (out / "inputs" / "photos" / "lq").rglob("*.png")} == lq
    assert pd.read_csv(out / "metrics.csv", keep_default_na=False).equals(csv)


def test_fid_against_a_reference_folder(
    tmp_path, mlflow_store, model_dir, hq_dir, blurred_dir, fid_reference, monkeypatch
):
    version = registry.register_model(new_run(), model_dir, "diffbir")
    out, label = tmp_path / "eval", f"diffbir-v{version}"
    weights = {"fid": str(random_weights("fid", tmp_path))}
    benchmark = dict(name="photos", hq=str(hq_dir), degradation="realesrgan", seed=7, fid_reference=str(fid_reference))
    cfg = config(
        out,
        [f"models:/diffbir/{version}"],
        hq_dir,
        benchmarks=[benchmark],
        settings=SETTINGS[:1],
        compare=[f"blur={blurred_dir}"],
        metrics=dict(names=["psnr", "fid"], weights=weights),
        grid_images=1,  # a stage-1 image beside the restored ones: not part of the set FID measures
    )
    summary = ev.evaluate(cfg)
    n = len(PHOTOS)
    assert summary["fid_this_run"] == 2 and summary["rows"] == 2 * n  # a column of the model, one of blur

    # metrics.csv: one FID per column, n its images, no std; per_image.parquet: PSNR only
    csv = pd.read_csv(out / "metrics.csv")
    fid = csv[csv.metric == "fid"].set_index("model")
    assert list(csv.metric) == ["psnr", "psnr", "fid", "fid"]  # per benchmark: the per-image metrics, then FID
    assert list(fid.index) == [label, "blur"] and list(fid.setting) == ["s0", "-"] and set(fid.n) == {n}
    assert fid["std"].isna().all() and np.isfinite(fid["mean"]).all()
    assert set(pq.read_table(out / "per_image.parquet").to_pandas()["metric"]) == {"psnr"}
    # the value: the FID of exactly the column's images against the reference
    restored = sorted((out / "images" / "photos" / label / "s0").rglob("*.png"))
    assert len(restored) == n + 1  # and a stage-1 image
    files = [p for p in restored if not p.name.endswith(".stage1.png")]
    assert fid.loc[label, "mean"] == pytest.approx(FID(MetricsConfig(weights=weights))(files, fid_reference))

    # table.md: a row FID ↓, the lower the better; MLflow: a metric and a version tag like the others
    table = (out / "table.md").read_text()
    assert f"FID against the images of {fid_reference}" in table
    lines = [line for line in table.splitlines() if line.startswith("| FID")]
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    assert cells[0] == "FID ↓" and [float(c.strip("*")) for c in cells[1:]] == pytest.approx(
        list(fid["mean"]), abs=0.01
    )
    assert [c.startswith("**") for c in cells[1:]] == list(fid["mean"] == fid["mean"].min())
    metrics = MlflowClient().get_run(summary["run_id"]).data.metrics
    assert metrics[f"photos.{label}.s0.fid"] == pytest.approx(fid.loc[label, "mean"])
    assert metrics["photos.blur.-.fid"] == pytest.approx(fid.loc["blur", "mean"])
    tags = MlflowClient().get_model_version("diffbir", version).tags
    assert float(tags["eval.photos.s0.fid"]) == pytest.approx(fid.loc[label, "mean"])

    # a rerun computes no FID again (it does not even load the network) and reports the same
    monkeypatch.setattr(FID, "__init__", lambda *_: pytest.fail("FID built on a rerun"))
    again = ev.evaluate(cfg)
    assert (again["fid_this_run"], again["scored_rows_this_run"], again["restored_this_run"]) == (0, 0, 0)
    assert pd.read_csv(out / "metrics.csv").equals(csv)


def test_an_interrupted_run_resumes_without_recomputing(tmp_path, mlflow_store, model_dir, hq_dir, monkeypatch):
    out = tmp_path / "eval"
    cfg = config(out, [str(model_dir)], hq_dir, batch_size=1)
    save = ev.ScoreStore.save

    def crash_after_first_part(self, rows):
        save(self, rows)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ev.ScoreStore, "save", crash_after_first_part)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg)
    monkeypatch.setattr(ev.ScoreStore, "save", save)
    restored = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png") if not p.name.endswith(".stage1.png")}
    first = pq.read_table(next((out / "parts").glob("*.parquet"))).to_pandas()
    total = len(PHOTOS) * len(SETTINGS)
    assert 1 <= len(restored) < total and not (out / "per_image.parquet").exists()

    # the same names meaning something else would mix results: refused
    other = [SETTINGS[0], dict(name="s0.5", options=dict(guidance_scale=0.5, steps=3))]
    with pytest.raises(EvalError, match="another meaning of settings: photos/tiny/s0.5"):
        ev.evaluate(config(out, [str(model_dir)], hq_dir, batch_size=1, settings=other))

    summary = ev.evaluate(cfg)
    assert summary["restored_this_run"] == total - len(restored)
    assert {p: p.stat().st_mtime_ns for p in restored} == restored  # not restored again
    assert summary["scored_rows_this_run"] == summary["rows"] - len(first) == total * len(METRICS) - len(first)
    per_image = pq.read_table(out / "per_image.parquet").to_pandas()
    assert not per_image.duplicated(ev.KEY + ["metric"]).any() and len(per_image) == total * len(METRICS)
    assert len(list((out / "images").rglob("*.stage1.png"))) == 2


def test_refusals(tmp_path, mlflow_store, model_dir, hq_dir, blurred_dir):
    out = tmp_path / "eval"  # none of these gets as far as restoring
    with pytest.raises(EvalError, match="is not a folder"):
        ev.evaluate(config(out, [str(model_dir)], tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(EvalError, match="holds no images"):
        ev.evaluate(config(out, [str(model_dir)], tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        ev.evaluate(config(out, [str(model_dir)], hq_dir, metrics=dict(names=["psnr", "nope"])))
    partial = tmp_path / "partial"
    shutil.copytree(blurred_dir, partial)
    (partial / "coffee.jpg").unlink()
    with pytest.raises(EvalError, match=re.escape("1 of the 3 images of benchmark photos have no file")):
        ev.evaluate(config(out, [str(model_dir)], hq_dir, compare=[f"other={partial}"]))
    with pytest.raises(registry.RegistryError, match="not a platform model directory"):
        ev.evaluate(config(out, [str(tmp_path)], hq_dir))
    with pytest.raises(EvalError, match="restores to 256x256 but its HQ image is 64x64"):
        ev.evaluate(config(out, [str(model_dir)], hq_dir, options=dict(upscale=4, min_side=64, steps=2)))
    real = [dict(name="real", lq=str(hq_dir))]
    with pytest.raises(EvalError, match="no-reference metric"):
        ev.evaluate(config(out, [str(model_dir)], hq_dir, benchmarks=real))
    assert not (out / "images").exists()  # nothing was restored

    bad = [
        dict(settings=[SETTINGS[0], SETTINGS[0]]),  # duplicate names
        dict(settings=[dict(name="s", options=dict(steps=0))]),  # not a RestoreOptions
        dict(compare=["no-folder"]),
        dict(compare=["nobench:x=/tmp"]),
        dict(benchmarks=[dict(name="both", hq="/a", lq="/b")]),
        dict(max_images=0),
    ]
    for overrides in bad:
        with pytest.raises(ValidationError):
            config(out, [str(model_dir)], hq_dir, **overrides)
    # fid: a set metric, measured on the benchmarks that name a reference folder, from a weights file
    with_fid = dict(names=["psnr", "fid"])
    with pytest.raises(ValidationError, match="fid is a set metric.*no benchmark names one"):
        config(out, [str(model_dir)], hq_dir, metrics=with_fid)
    reference = dict(name="photos", hq=str(hq_dir), fid_reference=str(tmp_path / "nothing"))
    with pytest.raises(ValidationError, match=r"\['photos'\] name a fid_reference: add fid to metrics.names"):
        config(out, [str(model_dir)], hq_dir, benchmarks=[reference])
    with pytest.raises(EvalError, match="benchmark photos, fid_reference: .*nothing is not a folder"):
        ev.evaluate(config(out, [str(model_dir)], hq_dir, benchmarks=[reference], metrics=with_fid))
    reference["fid_reference"] = str(hq_dir)
    with pytest.raises(ValueError, match="fid: no weights file configured"):
        ev.evaluate(config(tmp_path / "fid", [str(model_dir)], hq_dir, benchmarks=[reference], metrics=with_fid))


def test_cli_reports_errors(tmp_path, capsys, model_dir):
    argv = ["--config", str(TINY_YAML), "--models", str(model_dir), "--output", str(tmp_path / "out")]
    argv += ["--benchmarks", json.dumps([dict(name="b", hq=str(tmp_path / "missing"))])]
    assert ev.main(argv) == 1
    assert re.search(r"evaluate: error: benchmark b: .*missing is not a folder", capsys.readouterr().err)
