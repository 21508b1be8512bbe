"""training.registry on a real MLflow store (SQLite in tmp) with real platform models (tiny weights)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pytest
import torch

from diffbir.checkpoints.io import CheckpointError
from diffbir.checkpoints.loading import load_model
from training import registry
from training.registry import RegistryError

from conftest import new_run, save_tiny

NAME = "diffbir-test"


@pytest.fixture(scope="module")
def two_versions(mlflow_store, tiny_bundle):
    """v1: the reference weights, v2: stage 1 perturbed; with their runs."""
    runs = [new_run(), new_run()]
    lineage = {"data_shards": ["shard-000000.tar", "shard-000001.tar"], "config_hash": "sha256:abc123"}
    for i, (run_id, noise) in enumerate(zip(runs, (0.0, 0.05)), 1):
        model_dir = save_tiny(mlflow_store / f"model{i}", tiny_bundle, noise)
        assert registry.register_model(run_id, model_dir, NAME, {"val_psnr": 20.0 + i}, lineage) == str(i)
    return runs


def swinir_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(model_dir, parts=["swinir"]).parts["swinir"].module.state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tracking_uri_env_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert registry.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert registry.tracking_uri(tmp_path) == "http://mlflow.internal:5000"


def test_versions_carry_lineage_and_artifacts_stay_in_store(mlflow_store, two_versions):
    info = registry.version_info(f"models:/{NAME}/1")
    assert info["name"] == NAME and info["version"] == "1" and info["alias"] is None
    assert info["run_id"] == two_versions[0] and info["uri"] == f"models:/{NAME}/1"
    assert info["source"].startswith("models:/m-")  # an MLflow 3 logged model
    tags = info["tags"]
    assert tags["lineage.run_id"] == two_versions[0]
    assert tags["lineage.config_hash"] == "sha256:abc123"
    assert json.loads(tags["lineage.data_shards"]) == ["shard-000000.tar", "shard-000001.tar"]
    assert float(tags["metric.val_psnr"]) == 21.0
    assert registry.latest_version(NAME) == "2"
    # the local store keeps artifacts beside its database, not in the working directory
    assert list((mlflow_store / "store" / "artifacts" / "models").glob("m-*/artifacts/model.json"))


def test_resolve_by_alias_version_and_local_dir(mlflow_store, two_versions, tiny_bundle):
    reference = tiny_bundle.parts["swinir"].module.state_dict()
    registry.set_alias(NAME, "champion", "1")
    champion = registry.resolve(f"models:/{NAME}@champion")
    assert same_weights(swinir_state(champion), reference)
    assert champion == registry.resolve(f"models:/{NAME}/1")  # one cache entry per version
    assert not same_weights(swinir_state(registry.resolve(f"models:/{NAME}/2")), reference)

    info = registry.version_info(f"models:/{NAME}@champion")
    assert (info["version"], info["alias"], info["aliases"]) == ("1", "champion", ["champion"])

    registry.set_alias(NAME, "champion", "2")  # serving polls this to notice the move
    assert registry.alias_version(NAME, "champion") == "2"
    assert registry.version_info(f"models:/{NAME}@champion")["uri"] == f"models:/{NAME}/2"
    assert registry.alias_version(NAME, "staging") is None

    local = mlflow_store / "model1"
    assert registry.resolve(local) == local
    assert registry.version_info(str(local))["version"] is None


def test_cache_downloads_each_version_once(mlflow_store, two_versions, tmp_path, monkeypatch):
    calls = []
    download = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **kw: calls.append(kw) or download(**kw))
    first = registry.resolve(f"models:/{NAME}/1", cache_dir=tmp_path)
    registry.set_alias(NAME, "champion", "1")
    assert registry.resolve(f"models:/{NAME}@champion", cache_dir=tmp_path) == first
    assert registry.resolve(f"models:/{NAME}/1", cache_dir=tmp_path) == first
    assert len(calls) == 1
    assert first.is_relative_to(tmp_path) and first.parts[-2:] == (NAME, "1")
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(
    "uri, message",
    [
        ("models:/nope@champion", "no registered model named 'nope'"),
        (f"models:/{NAME}/99", f"'{NAME}' has no version 99"),
        (f"models:/{NAME}@nope", f"'{NAME}' has no alias 'nope'"),
        ("runs:/abc/model", "not a platform model directory"),
        ("models:/m-123", "expected models:/<name>@<alias>"),
    ],
)
def test_resolve_errors(two_versions, uri, message):
    with pytest.raises(RegistryError, match=message):
        registry.resolve(uri)


def test_register_refuses_non_model_dir(mlflow_store, tmp_path):
    with pytest.raises(CheckpointError, match="not a platform model directory"):
        registry.register_model(new_run(), tmp_path, NAME)


def test_move_alias_is_compare_and_set(mlflow_store, two_versions, monkeypatch):
    registry.set_alias(NAME, "cas", "1")
    with pytest.raises(registry.AliasMovedError, match=f"@cas of '{NAME}' now names v1, not v2") as moved:
        registry.move_alias(NAME, "cas", "2", expected="2")
    assert moved.value.current == "1" and registry.alias_version(NAME, "cas") == "1"
    with pytest.raises(registry.AliasMovedError, match="now names v1, not no version"):
        registry.move_alias(NAME, "cas", "2", expected=None)
    registry.move_alias(NAME, "cas", "2", expected="1")
    assert registry.alias_version(NAME, "cas") == "2"

    # a lock left by a process that died: waited for while its lease runs, then broken
    lock = f"{registry.LOCK_PREFIX}{NAME}@cas"
    client = mlflow.MlflowClient()
    client.create_registered_model(lock, tags={"expires": repr(time.time() + 0.5)})
    with pytest.raises(RegistryError, match="no registered model named 'nope'") as unknown:
        registry.alias_version("nope", "cas")
    assert lock not in str(unknown.value)  # locks are not listed as models
    monkeypatch.setattr(registry, "LOCK_WAIT_S", 0.2)
    with pytest.raises(RegistryError, match=f"is locked by another alias move \\(registered model '{lock}'\\)"):
        registry.move_alias(NAME, "cas", "1", expected="2")
    time.sleep(0.5)
    registry.move_alias(NAME, "cas", "1", expected="2")
    assert registry.alias_version(NAME, "cas") == "1"
    assert not client.search_registered_models(f"name = '{lock}'")  # released
