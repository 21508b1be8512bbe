"""Tiny RM and GM runs through the real stack: Ray Train workers, DeepSpeed, the Ray Data feed
on shards of real photos, MLflow (SQLite in a temporary directory) and the registry.

- The RM run trains the shipped rm_tiny.yaml (300 steps) and must beat its degraded inputs on
  held-out crops.
- A second run of the same config loses its training worker to SIGKILL right after its first
  checkpoint: Ray Train starts a new worker, which restores model, optimizer, scheduler, noise
  generator and data position and finishes the budget on the first run's loss curve. Rerun
  under its name with a larger budget, it resumes from its last checkpoint, still on the curve.
- The GM run stacks IRControlNet on the tiny SD 2.1 with the trained RM as stage 1.
- Resuming with another batch size continues every rank's data stream where it stopped; with
  another world size it is refused.
- The user's own pairs (a folder of hq/ and lq/, x2) train an RM that resumes at its feed
  position, and a GM on an off-the-shelf x4 stage 1 (a spandrel file).
- A real MLflow server stopped mid-run and started again: the run finishes with every metric.
- publish() swaps a new final model in only once it is uploaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray
import ray.cloudpickle
import torch
from fsspec.implementations.local import LocalFileSystem
from mlflow import MlflowClient
from ray.train.v2.api.callback import UserCallback
from ray.util.state import list_actors
from safetensors.torch import save_file
from spandrel.architectures.ESRGAN import ESRGAN

from diffbir.checkpoints.loading import load_model
from diffbir.config import load_config
from pipelines.feed import TRAIN_PHOTOS, VAL_PHOTOS, pair_report, write_example_pairs, write_example_shards
from pipelines.ray_env import ensure_ray, free_port
from training import registry
from training.launch import RUN_TAG, config_hash, train
from training.loop import ResumeError, publish, restore
from training.train_gm import GMConfig
from training.train_rm import RMConfig

ROOT = Path(__file__).resolve().parents[1]
RM_TASK = "training.train_rm:RMTask"
TRAIN_METRICS = {
    "train/loss",
    "train/lr",
    "train/samples_per_s",
    "train/data_wait_s",
    "train/data_wait_frac",
    "train/peak_memory_mb",
}
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # KillOnce runs in Ray Train's controller


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():  # an earlier module's Ray, started without the dashboard Ray Train needs
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        # Ray's workers inherit it: MLflow's client gives up on an unreachable server at once, as
        # it does by default after about 4 minutes of retries, so the outage test takes seconds
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        ensure_ray(include_dashboard=True)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_example_shards(str(root / "data/train"))
    write_example_shards(str(root / "data/val"), VAL_PHOTOS)
    return root


def tiny(cls, yaml: str, root: Path, **overrides):
    """The shipped tiny config with this test's data, storage and MLflow store."""
    return load_config(
        cls,
        ROOT / "training/configs" / yaml,
        data=str(root / "data/train"),
        val_data=str(root / "data/val"),
        storage=str(root / "runs"),
        tracking_dir=str(root / "mlflow"),
        **overrides,
    )


def mlflow_run(cfg):
    (run,) = MlflowClient().search_runs(
        [registry.experiment_id(cfg.experiment)], f"tags.`{RUN_TAG}` = '{cfg.storage}/{cfg.name}'"
    )
    return run


def loss_curve(cfg) -> dict[int, float]:
    """Step -> logged loss; a step logged twice (before a kill and after the restart) must have
    the same value twice."""
    curve: dict[int, float] = {}
    for m in MlflowClient().get_metric_history(mlflow_run(cfg).info.run_id, "train/loss"):
        assert curve.setdefault(m.step, m.value) == pytest.approx(m.value, rel=1e-5), m.step
    return curve


def check_tracked(cfg, parts: set[str], system_metrics: bool = True) -> None:
    """Params, metrics, sample grids, the final model (artifact, storage, registry)."""
    run = mlflow_run(cfg)
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    assert set(type(cfg).model_fields) <= set(run.data.params)
    assert run.data.params["steps"] == str(cfg.steps)
    assert TRAIN_METRICS | {"val/psnr", "val/ssim"} <= set(run.data.metrics)
    if system_metrics:  # sampled every 10 s
        assert any(k.startswith("system/") for k in run.data.metrics), "no system metrics"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == cfg.steps // cfg.log_every
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert images and all(p.endswith(".png") for p in images)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/model.json"} | {
        f"model/{p}.safetensors" for p in parts
    }
    checkpoints = sorted(p.name for p in (Path(cfg.storage) / cfg.name).glob("checkpoint_*") if p.is_dir())
    assert checkpoints[-1] == f"checkpoint_{cfg.steps:08d}" and len(checkpoints) <= cfg.keep_checkpoints
    name, version = run.data.tags["registered_version"].split("/")
    info = registry.version_info(f"models:/{name}/{version}")
    assert info["run_id"] == run.info.run_id
    assert info["tags"]["lineage.data"] == cfg.data and info["tags"]["lineage.config_hash"] == config_hash(cfg)


@pytest.fixture(scope="module")
def rm_run(local_ray, workdir):
    cfg = tiny(RMConfig, "rm_tiny.yaml", workdir, name="rm")
    return cfg, train(cfg, "training.train_rm:RMTask")


def test_rm_run_is_tracked(rm_run):
    cfg, result = rm_run
    assert result.metrics["step"] == cfg.steps
    check_tracked(cfg, {"swinir"})
    stage1 = load_model(Path(cfg.storage) / cfg.name / "model").stage1
    assert stage1(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_rm_beats_its_degraded_inputs(rm_run):
    """Held-out photos (chelsea, motorcycle_right): PSNR of the restored crops vs the LQ crops."""
    _, result = rm_run
    m = result.metrics
    print(
        f"\nheld-out PSNR: RM {m['val/psnr']:.2f} dB vs LQ {m['val/psnr_lq']:.2f} dB; "
        f"SSIM: RM {m['val/ssim']:.3f} vs LQ {m['val/ssim_lq']:.3f}"
    )
    assert m["val/psnr"] > m["val/psnr_lq"] + 0.5


class KillOnce(UserCallback):
    """Runs in the Ray Train controller: after the first checkpoint is registered, SIGKILL the
    training worker (once: a marker file survives the restart)."""

    def __init__(self, marker: str):
        self.marker = marker

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None or os.path.exists(self.marker):
            return
        alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        (worker,) = list_actors(address=ray.get_runtime_context().gcs_address, filters=alive)
        Path(self.marker).write_text(f"killed {worker.pid} after step {metrics[0]['step']}")
        os.kill(worker.pid, signal.SIGKILL)


def test_killed_and_resumed_runs_stay_on_the_curve(rm_run, workdir):
    reference, _ = rm_run  # validation, checkpoints and the EMA draw no randomness: the same curve
    killed = reference.model_copy(
        update=dict(name="killed", steps=20, checkpoint_every=10, val_every=1000, register_as="", max_failures=1)
    )
    marker = workdir / "killed.txt"
    result = train(killed, "training.train_rm:RMTask", callbacks=[KillOnce(str(marker))])
    assert marker.read_text().endswith("after step 10")  # killed right after the first checkpoint,
    assert result.metrics["train/resumed_from"] == 10 and result.metrics["step"] == 20  # restored, finished

    resumed = train(killed.model_copy(update={"steps": 30}), "training.train_rm:RMTask")  # the same name: resumes
    assert resumed.metrics["train/resumed_from"] == 20 and resumed.metrics["step"] == 30

    expected, got = loss_curve(reference), loss_curve(killed)
    assert sorted(got) == [10, 20, 30]
    for step in got:  # the same data, noise and optimizer state at every step
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got, expected)


def test_gm_run_is_tracked(rm_run, workdir):
    rm_cfg, _ = rm_run
    cfg = tiny(
        GMConfig,
        "gm_tiny.yaml",
        workdir,
        name="gm",
        steps=6,
        log_every=2,
        val_every=3,
        image_every=6,
        checkpoint_every=3,
        stage1_weights=str(Path(rm_cfg.storage) / rm_cfg.name / "model"),
    )
    result = train(cfg, "training.train_gm:GMTask")
    assert result.metrics["step"] == cfg.steps
    assert {"val/psnr", "val/psnr_stage1"} <= set(result.metrics)
    check_tracked(cfg, {"unet", "controlnet", "vae", "swinir", "text_encoder"}, system_metrics=False)  # a short run
    model = load_model(Path(cfg.storage) / cfg.name / "model")
    assert model.diffusion.parameterization == "v"
    cldm = model.cldm
    z = torch.randn(1, 4, 8, 8)
    c_img = cldm.condition_latent(model.stage1(torch.rand(1, 3, 64, 64)))
    assert cldm(z, torch.tensor([999]), cldm.text_context([""]), c_img).shape == z.shape


def test_publish_uploads_the_new_model_before_removing_the_old(tmp_path, monkeypatch):
    def model(label: str) -> Path:
        d = tmp_path / label
        d.mkdir()
        for part in ("model.json", "swinir.safetensors"):
            (d / part).write_text(f"{label} {part}")
        return d

    target = tmp_path / "storage/run/model"
    publish(model("old"), str(target))
    put_file = LocalFileSystem.put_file
    uploaded = []

    def fail_on_second_file(self, lpath, rpath, **kwargs):
        if uploaded:
            raise OSError("connection lost during upload")
        uploaded.append(rpath)
        put_file(self, lpath, rpath, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "put_file", fail_on_second_file)
    with pytest.raises(OSError, match="connection lost"):
        publish(model("new"), str(target))
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        "model.json": "old model.json",
        "swinir.safetensors": "old swinir.safetensors",
    }
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no partial upload left

    monkeypatch.setattr(LocalFileSystem, "put_file", put_file)
    publish(tmp_path / "new", str(target))
    assert (target / "model.json").read_text() == "new model.json"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def short(name: str, workdir: Path, **overrides) -> RMConfig:
    """A few steps of rm_tiny.yaml: validated and imaged only at the end, not registered, no restarts."""
    fields = dict(steps=4, checkpoint_every=4, log_every=2, val_every=1000, image_every=1000, register_as="")
    return tiny(RMConfig, "rm_tiny.yaml", workdir, name=name, max_failures=0, **fields | overrides)


def test_resume_maps_the_data_position_or_refuses(local_ray, workdir):
    cfg = short("rebatch", workdir)  # 4 steps of 8 samples per rank
    assert train(cfg, RM_TASK).metrics["train/data_position"] == 32
    # half the batch from step 4 on: each rank goes on from sample 32 of its stream, not 4 * 4
    halved = train(cfg.model_copy(update={"steps": 8, "batch_size": 4}), RM_TASK).metrics
    assert (halved["train/resumed_from"], halved["train/data_position"]) == (4, 32 + 4 * 4)

    # 2 ranks on its last checkpoint: refused before anything is loaded (hence no engine here)
    last = ray.train.Checkpoint.from_directory(str(Path(cfg.storage) / cfg.name / "checkpoint_00000008"))
    with pytest.raises(ResumeError, match="was written by 1 ranks, this run has 2.*Resume with num_workers=1"):
        restore(last, None, None, None, rank=0, world=2)


@pytest.fixture(scope="module")
def pairs(workdir) -> Path:
    """LQ/HQ pair folders (x2) made from the example photos with the platform's degradation."""
    write_example_pairs(str(workdir / "pairs/train"), scale=2)
    write_example_pairs(str(workdir / "pairs/val"), VAL_PHOTOS, scale=2)
    return workdir / "pairs"


def test_paired_rm_run_resumes_on_its_pairs(local_ray, workdir, pairs):
    cfg = short("paired", workdir, lq_scale=2, val_every=4)
    cfg = cfg.model_copy(update={"data": str(pairs / "train"), "val_data": str(pairs / "val")})
    assert pair_report(cfg.index()).pairs == len(TRAIN_PHOTOS) and pair_report(cfg.val_index()).pairs == 2
    first = train(cfg, RM_TASK).metrics
    assert first["train/data_position"] == 32 and {"val/psnr", "val/psnr_lq"} <= set(first)
    resumed = train(cfg.model_copy(update={"steps": 6}), RM_TASK).metrics  # from data.json's position
    assert (resumed["train/resumed_from"], resumed["train/data_position"]) == (4, 48)


def test_gm_on_pairs_with_an_off_the_shelf_stage1(local_ray, workdir, pairs):
    """--stage1-weights: a spandrel file (a tiny x4 RRDBNet), run on the LQ reduced by 4."""
    stage1 = workdir / "rrdbnet_x4_tiny.safetensors"
    torch.manual_seed(0)
    save_file(ESRGAN(num_filters=8, num_blocks=1, scale=4).state_dict(), stage1)
    fields = dict(steps=2, log_every=1, val_every=2, image_every=2, checkpoint_every=2, register_as="", lq_scale=2)
    cfg = tiny(GMConfig, "gm_tiny.yaml", workdir, name="gm-paired", stage1_weights=str(stage1), **fields)
    cfg = cfg.model_copy(update={"data": str(pairs / "train"), "val_data": str(pairs / "val")})
    result = train(cfg, "training.train_gm:GMTask")
    assert result.metrics["step"] == 2 and "val/psnr_stage1" in result.metrics
    model = load_model(Path(cfg.storage) / cfg.name / "model")
    assert model.parts["stage1"].config["scale"] == 4


class MlflowServer:
    """A real `mlflow server` (SQLite store, local artifacts) on a free port, stopped and started again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
            *("--artifacts-destination", str(self.root / "artifacts")),
        ]
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._healthy():
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False


def test_mlflow_outage_mid_run_loses_no_metrics(local_ray, workdir, tmp_path, monkeypatch):
    """The server goes away after the first checkpoint and comes back a few seconds later, on the
    same port and store: training goes on meanwhile, and the run ends with every metric step."""
    server = MlflowServer(tmp_path)
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    cfg = short("outage", workdir, steps=12, log_every=1, image_every=6)
    run_dir = Path(cfg.storage) / cfg.name

    def outage():
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        time.sleep(3)
        server.start()

    stopper = threading.Thread(target=outage)
    stopper.start()
    try:
        result = train(cfg, RM_TASK)
        stopper.join()
        assert result.metrics["step"] == cfg.steps
        run = mlflow_run(cfg)
        client = MlflowClient()
        assert run.info.status == "FINISHED"
        for key in TRAIN_METRICS | {"train/data_position"}:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, 13)), key
        assert {a.path for a in client.list_artifacts(run.info.run_id, "images")} == {
            "images/step_00000006.png",
            "images/step_00000012.png",
        }
        assert "model/model.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    finally:
        stopper.join()
        server.stop()
        mlflow.set_tracking_uri(None)
