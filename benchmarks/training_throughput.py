"""Training throughput of the tiny RM and GM runs: samples/s and the fraction of the step time
the loop waits for data, through the whole stack (Ray Train worker, DeepSpeed, the Ray Data feed
crop+degrade tasks, MLflow logging).

    python benchmarks/training_throughput.py [--steps 60] [--warmup 20] [--workdir DIR]

Runs training/configs/rm_tiny.yaml and gm_tiny.yaml (their data: the example photo shards,
written to the workdir) and reads the per-window metrics the runs log to MLflow, skipping the
first `warmup` steps (Ray Data task start, first allocations). Prints one markdown row per
model and the command.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

from diffbir.config import load_config, parse_config
from pipelines.feed import VAL_PHOTOS, write_example_shards
from training import registry
from training.launch import RUN_TAG, train
from training.train_gm import GMConfig
from training.train_rm import RMConfig

ROOT = Path(__file__).resolve().parents[1]

RUNS = (
    ("RM", RMConfig, "rm_tiny.yaml", "training.train_rm:RMTask"),
    ("GM", GMConfig, "gm_tiny.yaml", "training.train_gm:GMTask"),
)


def measure(name, cls, yaml, task, workdir: Path, steps: int, warmup: int) -> dict:
    cfg = load_config(
        cls,
        ROOT / "training/configs" / yaml,
        name=f"bench-{name.lower()}",
        data=str(workdir / "data/train"),
        val_data=str(workdir / "data/val"),
        storage=str(workdir / "runs"),
        tracking_dir=str(workdir / "mlflow"),
        steps=steps,
        log_every=10,
        checkpoint_every=steps,
        val_every=steps,
        image_every=steps,
        register_as="",
    )
    train(cfg, task)
    client = MlflowClient()
    (run,) = client.search_runs(
        [registry.experiment_id(cfg.experiment)], f"tags.`{RUN_TAG}` = '{cfg.storage}/{cfg.name}'"
    )
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key) if m.step > warmup}
        for key in ("train/samples_per_s", "train/data_wait_frac", "train/peak_memory_mb")
    }
    return {
        "samples_per_s": statistics.median(history["train/samples_per_s"].values()),
        "data_wait_frac": statistics.median(history["train/data_wait_frac"].values()),
        "peak_memory_mb": max(history["train/peak_memory_mb"].values()),
        "batch": cfg.batch_size * cfg.num_workers,
        "crop": cfg.crop_size,
    }


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(60, ge=1, description="training steps of each run")
    warmup: int = Field(20, ge=0, description="steps left out of the figures")
    workdir: str | None = Field(None, description="data, checkpoints and MLflow store; None: a temporary directory")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/training_throughput.py")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        write_example_shards(str(workdir / "data/train"))
        write_example_shards(str(workdir / "data/val"), VAL_PHOTOS)
        rows = [(name, measure(name, *spec, workdir, args.steps, args.warmup)) for name, *spec in RUNS]
    print(
        f"\nCommand: `.venv/bin/python benchmarks/training_throughput.py --steps {args.steps} --warmup {args.warmup}` "
        f"({platform.machine()}, {os.cpu_count()} CPUs, 1 Ray Train worker; "
        f"medians of the 10-step windows after step {args.warmup})\n"
    )
    print("| model | batch | crop | samples/s | data-wait fraction | peak RSS (worker) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| tiny {name} | {r['batch']} | {r['crop']} | {r['samples_per_s']:.1f} | {r['data_wait_frac']:.3f} "
            f"| {r['peak_memory_mb'] / 1024:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
