"""The layers form a straight stack, diffbir ← pipelines ← training ← serving: a module imports
its own layer and those below it, never one above, and the model library (diffbir) needs no Ray,
MLflow or DeepSpeed. Static: every import statement of every module, at any depth (function-level
and TYPE_CHECKING imports too), relative ones resolved to the module they name."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("diffbir", "pipelines", "training", "serving")  # lowest first
# the model library runs anywhere: no cluster, tracking server or distributed optimizer
FORBIDDEN = {"diffbir": ("ray", "mlflow", "deepspeed")}


def imports(path: Path, root: Path) -> Iterator[tuple[ast.stmt, str]]:
    """(statement, absolute name of the module it imports) for every import in the file at `path`."""
    package = list(path.relative_to(root).parts[:-1])  # where `from .` points, for a module or an __init__
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            yield node, ".".join(base + [node.module] if node.module else base)


def layering_violations(root: Path, layers=LAYERS, forbidden=FORBIDDEN) -> list[str]:
    """`file:line: import — why` for every upward or forbidden import of the `layers` under `root`."""
    problems = []
    for rank, layer in enumerate(layers):
        for path in sorted((root / layer).rglob("*.py")):
            for node, name in imports(path, root):
                top = name.split(".")[0]
                where = f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}"
                if top in layers[rank + 1 :]:
                    problems.append(f"{where} — {layer} may not import {top}, a layer above it")
                elif top in forbidden.get(layer, ()):
                    problems.append(f"{where} — {layer} may not import {top}")
    return problems


def test_the_layers_form_a_straight_stack():
    assert layering_violations(ROOT) == []


def test_the_checker_finds_upward_and_forbidden_imports_at_any_depth(tmp_path):
    files = {
        "low/__init__.py": "from .core import f\n",
        "low/core.py": "import os\n\nfrom low import sub\n\n\ndef f():\n    import ray.data\n",
        "low/ray.py": "",
        "low/sub/__init__.py": "from ..ray import x\nfrom . import deep\n",  # low.ray, low.sub: allowed
        "low/sub/deep.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from high.api import g\n",
        "low/up.py": "import high\n",
        "high/__init__.py": "import ray\nfrom low import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert layering_violations(tmp_path, ("low", "high"), {"low": ("ray",)}) == [
        "low/core.py:7: import ray.data — low may not import ray",
        "low/sub/deep.py:4: from high.api import g — low may not import high, a layer above it",
        "low/up.py:1: import high — low may not import high, a layer above it",
    ]
