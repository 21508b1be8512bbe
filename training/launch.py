"""The driver side of a training run: join or start Ray, open the MLflow run, index the data,
launch the Ray Train workers, register the final model.

Works the same as a `ray job submit` entrypoint (RAY_ADDRESS is set: join that cluster) and as
a plain `python training/train_*.py` (start a local Ray on 127.0.0.1). Rerunning a run name
resumes it: Ray Train finds its latest checkpoint in <storage>/<name>, and the MLflow run with
the same name and storage continues.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import fsspec
import mlflow
import pyarrow.fs
import ray
from mlflow import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from diffbir.config import parse_config
from pipelines.ray_env import ensure_ray
from training import registry
from training.config import TrainConfig
from training.loop import train_loop_per_worker

RUN_TAG = "diffbir.train_run"  # <storage>/<name>: the Ray Train run an MLflow run belongs to


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The base JSON with the typed config's batch, accumulation, clipping, lr, ZeRO stage and
    precision written in."""
    ds = json.loads(Path(cfg.deepspeed_config).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = cfg.grad_clip or 0.0
    ds["zero_optimization"] = ds.get("zero_optimization", {}) | {"stage": cfg.zero_stage}
    ds["bf16"] = ds.get("bf16", {}) | {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = ds.get("fp16", {}) | {"enabled": cfg.precision == "fp16"}
    ds["optimizer"]["params"] = ds["optimizer"].get("params", {}) | {"lr": cfg.lr}
    return ds


def train(cfg: TrainConfig, task: str, callbacks: list | None = None):
    """Run (or resume) `cfg` with the task class at `task` ("module:Class"); returns Ray
    Train's Result. `callbacks`: Ray Train UserCallbacks (run on the controller)."""
    ensure_ray(include_dashboard=True)
    tracking_uri = registry.configure(cfg.tracking_dir)
    ds_config = deepspeed_config(cfg)
    run_id = mlflow_run(cfg, ds_config)
    if "://" in cfg.storage:
        fs, storage_path = fsspec.core.url_to_fs(cfg.storage)
        storage_fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    else:
        storage_path, storage_fs = cfg.storage, None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(
            task=task,
            config=cfg.model_dump(),
            deepspeed=ds_config,
            tracking_uri=tracking_uri,
            run_id=run_id,
            # indexed once here; every worker (and every restart) shares the object
            index=ray.put(cfg.index()),
            val_index=ray.put(cfg.val_index()),
        ),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
    )
    client = MlflowClient()
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if cfg.register_as:
        version = register(cfg, run_id, result)
        client.set_tag(run_id, "registered_version", f"{cfg.register_as}/{version}")
    client.set_terminated(run_id, "FINISHED")
    return result


def run_from_command_line(config_cls: type[TrainConfig], task: str, argv: list[str] | None, description: str) -> None:
    """`python training/train_*.py [--config FILE] [--field value ...]`: train and say where it ended."""
    cfg = parse_config(config_cls, argv, description)
    result = train(cfg, task)
    print(f"finished {cfg.name} at step {result.metrics.get('step')}: {result.metrics}")
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")


def mlflow_run(cfg: TrainConfig, ds_config: dict) -> str:
    """The MLflow run of this Ray Train run: found by its tag when resuming, else created with
    every config field as a param. A resumed run whose config changed (e.g. more steps) keeps
    its first params and records the new values as `override.<field>` tags."""
    client = MlflowClient()
    exp = registry.experiment_id(cfg.experiment)
    key = f"{cfg.storage}/{cfg.name}"
    found = client.search_runs([exp], filter_string=f"tags.`{RUN_TAG}` = '{key}'", max_results=1)
    params = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in cfg.model_dump().items()}
    if found:
        run_id, logged = found[0].info.run_id, found[0].data.params
        client.update_run(run_id, "RUNNING")
        for k, v in params.items():
            if k not in logged:
                client.log_param(run_id, k, v)
            elif logged[k] != v:
                client.set_tag(run_id, f"override.{k}", v)
        return run_id
    run = client.create_run(exp, run_name=cfg.name, tags={RUN_TAG: key})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    client.log_dict(run.info.run_id, ds_config, "deepspeed.json")
    return run.info.run_id


def config_hash(cfg: TrainConfig) -> str:
    """Names the exact training config (every field, canonical JSON) in a version's lineage."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def register(cfg: TrainConfig, run_id: str, result) -> str:
    """Register the final model (logged by rank 0 under the run's `model/` artifacts)."""
    metrics = {k.removeprefix("val/"): v for k, v in result.metrics.items() if k.startswith("val/")}
    lineage = {
        "data": cfg.data,
        "train_run": f"{cfg.storage}/{cfg.name}",
        "steps": cfg.steps,
        "config_hash": config_hash(cfg),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model", dst_path=tmp)
        return registry.register_model(run_id, model_dir, cfg.register_as, metrics=metrics, lineage=lineage)
