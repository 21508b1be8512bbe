"""Refresh the repository's copy of the reference data from the team's shared reference folder.

    python tests/golden/refresh.py [--source DIR]     (make refresh-golden)

New fixtures arrive in the shared folder (`reference/` beside the repository on the team's
machines); the tests, the benchmarks and the package only ever read the copy kept here:
- every golden set `golden/<set>/` -> `tests/golden/<set>/`, without its tiny weight files: they
  are re-created bit for bit by the key-based initialisation (diffbir.checkpoints.tiny), and this
  script checks that against the sha256 the set's weights manifest records;
- `manifests/` (official key layouts) -> `tests/golden/manifests/`;
- `TIMINGS.md` (the reference's own timings) -> `benchmarks/reference_timings.md`;
- the layout of set `shared`'s tiny files -> `diffbir/checkpoints/tiny_layout.json`, the model
  `diffbir init-tiny` writes.
This is the only file of the repository that names the shared folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from diffbir.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
DEFAULT_SOURCE = ROOT.parent / "shared" / "reference"
DERIVED_WEIGHTS = (".safetensors", ".ckpt")  # re-created, never stored


def copy_set(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    for path in sorted(src.rglob("*")):
        if path.is_file() and not (path.parent.name == "weights" and path.suffix in DERIVED_WEIGHTS):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def check_recreated(set_dir: Path) -> None:
    """The set's tiny safetensors files, re-created from its layout and salt, are its files."""
    from diffbir.checkpoints.tiny import write_keyed_files

    manifest_path = set_dir / "weights" / "weights_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    salt = json.loads((set_dir / "set.json").read_text())["tiny_weights_init_salt"]
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_keyed_files(tmp, manifest_path, salt):
            if hashlib.sha256(path.read_bytes()).hexdigest() != manifest[path.name]["sha256"]:
                raise SystemExit(f"{set_dir.name}/{path.name}: the re-created file differs from the reference's")


def tiny_layout(weights_manifest: Path) -> dict:
    """The weights manifest of the tiny files cut to what making them needs (key, shape, dtype)."""
    manifest = json.loads(weights_manifest.read_text())
    return {
        name: {"tensors": {k: {"shape": t["shape"], "dtype": t["dtype"]} for k, t in entry["tensors"].items()}}
        for name, entry in manifest.items()
        if "tensors" in entry and name.endswith(".safetensors")
    }


class RefreshConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(str(DEFAULT_SOURCE), description="the team's shared reference folder")


def main(argv: list[str] | None = None) -> int:
    src = Path(parse_config(RefreshConfig, argv, __doc__, "python tests/golden/refresh.py").source)
    if not (src / "golden").is_dir():
        print(f"refresh-golden: {src} holds no golden/ folder; nothing to refresh", file=sys.stderr)
        return 1
    for set_src in sorted(p for p in (src / "golden").iterdir() if (p / "set.json").is_file()):
        copy_set(set_src, GOLDEN / set_src.name)
        check_recreated(GOLDEN / set_src.name)
        print(f"golden set {set_src.name}: {sum(1 for p in (GOLDEN / set_src.name).rglob('*') if p.is_file())} files")
    if (src / "manifests").is_dir():
        copy_set(src / "manifests", GOLDEN / "manifests")
    if (src / "TIMINGS.md").is_file():
        shutil.copyfile(src / "TIMINGS.md", ROOT / "benchmarks" / "reference_timings.md")
    layout = tiny_layout(src / "golden" / "shared" / "weights" / "weights_manifest.json")
    (ROOT / "diffbir" / "checkpoints" / "tiny_layout.json").write_text(json.dumps(layout, indent=0) + "\n")
    print("manifests, reference timings and the tiny layout refreshed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
