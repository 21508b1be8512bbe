"""Peak memory of loading full-size official weights (SD 2.1-base + IRControlNet) into the models.

Writes full-size checkpoints in the released layouts (a `{"state_dict": ...}` torch pickle for SD
2.1, a bare state dict for IRControlNet; weights from the key-based initialisation), then loads
them in fresh processes and records peak RSS after every weight has been touched (summed), so the
figure is the resident cost of a ready model, not of lazily mapped pages.

    python benchmarks/load_memory.py [--workdir DIR] [--repeats 3] [--platform]

--platform also converts them to the platform format (safetensors) and measures loading that.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from diffbir.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("DIFFBIR_GOLDEN", ROOT / "tests" / "golden" / "shared"))

# Peak RSS from VmHWM: unlike getrusage's ru_maxrss it is not inherited across fork+exec from
# the (large) parent that generated the files.
CHILD = r"""
import sys, time, json, torch
from diffbir.checkpoints.loading import load_model
def hwm_gb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 / 1e9
base = hwm_gb()
t = time.perf_counter()
bundle = load_model(sys.argv[1:])
load_s = time.perf_counter() - t
total = 0.0
nbytes = 0
for part in bundle.parts.values():
    for v in part.module.state_dict().values():
        total += float(v.double().sum()) if v.is_floating_point() else 0.0  # touch every page
        nbytes += v.numel() * v.element_size()
ready_s = time.perf_counter() - t
print(json.dumps({"weights_gb": nbytes / 1e9, "peak_rss_gb": hwm_gb(), "import_rss_gb": base,
                  "load_s": load_s, "ready_s": ready_s}))
"""


def write_official(workdir: Path) -> list[Path]:
    import torch

    from diffbir.utils.keyed_init import keyed_state_dict

    files = json.loads((GOLDEN / "configs" / "full_keys.json").read_text())["files"]
    shapes = {k.split()[0]: {key: s for key, (s, _) in v.items()} for k, v in files.items()}
    sd_path, cn_path = workdir / "v2-1_512-ema-pruned.ckpt", workdir / "v2.pth"
    if not sd_path.exists():
        torch.save({"state_dict": keyed_state_dict(shapes["sd21"], 0)}, sd_path)
    if not cn_path.exists():
        torch.save(keyed_state_dict(shapes["ircontrolnet"], 0), cn_path)
    return [sd_path, cn_path]


def measure(paths: list[Path], repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["ratio"] = med["peak_rss_gb"] / med["weights_gb"]
    return med


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workdir: str = Field(
        str(Path(tempfile.gettempdir()) / "diffbir-load-bench"), description="where the full-size files are kept"
    )
    repeats: int = Field(3, ge=1, description="fresh loading processes (median taken)")
    platform: bool = Field(False, description="also measure the converted platform format")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/load_memory.py")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = write_official(workdir)
    print(f"official files ready in {time.perf_counter() - t:.0f} s: {[p.name for p in paths]}")
    results = {"official (.ckpt pickle + .pth)": measure(paths, args.repeats)}
    if args.platform:
        from diffbir.checkpoints.loading import convert
        from diffbir.config import DiffusionConfig

        out = workdir / "platform"
        if not out.exists():
            convert(paths, out, diffusion=DiffusionConfig())
        results["platform (safetensors)"] = measure([out], args.repeats)
    for name, r in results.items():
        print(
            f"{name}: weights {r['weights_gb']:.2f} GB, peak RSS {r['peak_rss_gb']:.2f} GB "
            f"(ratio {r['ratio']:.3f}; after imports {r['import_rss_gb']:.2f} GB), "
            f"load {r['load_s']:.1f} s, all weights resident {r['ready_s']:.1f} s"
        )


if __name__ == "__main__":
    main()
