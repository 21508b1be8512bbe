"""Two-node training: a Ray cluster of two nodes on 127.0.0.1 (1 CPU each), one DeepSpeed rank
per node (ZeRO-3, fp32, gloo, EMA), checkpoints in storage given as an fsspec URL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from ray.cluster_utils import Cluster
from ray.train.v2.api.callback import UserCallback
from ray.util.state import list_actors

from diffbir.config import load_config
from pipelines.feed import VAL_PHOTOS, write_example_shards
from pipelines.ray_env import loopback_env
from training.launch import train
from training.train_rm import RMConfig

ROOT = Path(__file__).resolve().parents[1]
ALIVE_WORKERS = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callback runs in Ray's controller


@pytest.fixture
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    loopback_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


class RecordNodes(UserCallback):
    """Runs in the Ray Train controller: writes which nodes the training workers run on."""

    def __init__(self, out: str):
        self.out = out

    def after_report(self, run_context, metrics, checkpoint):
        workers = list_actors(address=ray.get_runtime_context().gcs_address, filters=ALIVE_WORKERS)
        Path(self.out).write_text(json.dumps(sorted(w.node_id for w in workers)))


def test_two_ranks_on_two_nodes(two_nodes, tmp_path):
    write_example_shards(str(tmp_path / "data/train"))
    write_example_shards(str(tmp_path / "data/val"), VAL_PHOTOS)
    cfg = load_config(
        RMConfig,
        ROOT / "training/configs/rm_tiny.yaml",
        name="two-nodes",
        data=str(tmp_path / "data/train"),
        val_data=str(tmp_path / "data/val"),
        storage=f"file://{tmp_path}/runs",
        tracking_dir=str(tmp_path / "mlflow"),
        num_workers=2,
        cpus_per_worker=0.5,
        placement_strategy="SPREAD",
        zero_stage=3,
        data_workers=1,
        steps=4,
        log_every=2,
        checkpoint_every=2,
        val_every=4,
        image_every=4,
        val_samples=2,
        register_as="",
    )
    nodes = tmp_path / "nodes.json"
    result = train(cfg, "training.train_rm:RMTask", callbacks=[RecordNodes(str(nodes))])
    assert result.metrics["step"] == 4
    assert len(set(json.loads(nodes.read_text()))) == 2  # one rank per node
    ranks = sorted(p.name for p in Path(result.checkpoint.path).rglob("*optim_states.pt"))
    assert len(ranks) == 2  # both ZeRO-3 optimizer partitions in the merged checkpoint
    assert (tmp_path / "runs/two-nodes/model/model.json").is_file()
