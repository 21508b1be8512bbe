"""Every shipped YAML under */configs/ loads into the model that reads it; a new YAML fails here
until MODELS names its model."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter
from ray.serve.schema import ServeDeploySchema

from pipelines.degradations import DegradationConfig
from pipelines.filter_laion import FilterLaionConfig
from serving.archive import ArchiveConfig
from serving.config import ServeConfig
from training.evaluate import EvalConfig
from training.promote import PromoteConfig
from training.train_gm import GMConfig
from training.train_rm import RMConfig

from conftest import infra_demo

ROOT = Path(__file__).resolve().parents[1]

# path pattern (from the repository root) -> the model its files load into
MODELS = {
    "infra/configs/demo.yaml": infra_demo().DemoConfig,
    "pipelines/configs/degradations/*.yaml": DegradationConfig,
    "pipelines/configs/filter_laion.yaml": FilterLaionConfig,
    "serving/configs/archive.yaml": ArchiveConfig,
    "serving/configs/serve.yaml": ServeConfig,
    "serving/configs/serve_deploy.yaml": ServeDeploySchema,
    "training/configs/degradation_tiny.yaml": DegradationConfig,
    "training/configs/eval_*.yaml": EvalConfig,
    "training/configs/gm_*.yaml": GMConfig,
    "training/configs/promote.yaml": PromoteConfig,
    "training/configs/rm_*.yaml": RMConfig,
}
# fields a file leaves to the command line (make restore-archive IN=... OUT=...)
FLAGS = {"serving/configs/archive.yaml": {"input": "in.tar", "output": "out.tar"}}
SHIPPED = sorted(str(p.relative_to(ROOT)) for ext in ("yaml", "yml") for p in ROOT.glob(f"*/configs/**/*.{ext}"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads_into_its_model(name, monkeypatch):
    (pattern,) = [p for p in MODELS if fnmatch(name, p)] or pytest.fail(f"{name}: register its model in MODELS")
    monkeypatch.chdir(ROOT)  # relative paths in the files are relative to the repository root
    data = yaml.safe_load((ROOT / name).read_text())
    TypeAdapter(MODELS[pattern]).validate_python({**data, **FLAGS.get(name, {})})


def test_every_registered_pattern_names_a_shipped_yaml():
    assert [p for p in MODELS if not any(fnmatch(name, p) for name in SHIPPED)] == []
