"""`make demo`: the whole platform loop on one machine, on the embedded defaults.

Starts a Ray head and an MLflow server on 127.0.0.1, then runs what a user would run, each step
through its own `make` verb: filter the embedded LAION sample, train the tiny RM and GM as Ray
jobs on the filtered shards, promote the GM to `@champion`, serve it with Ray Serve and restore
one image over HTTP, restore a sample archive. Prints where to look and stops everything it
started, also on Ctrl-C or a failed step. Step timings go to <workdir>/timings.json.

    .venv/bin/python infra/demo.py [--config infra/configs/demo.yaml] [--workdir runs/demo]
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffbir.config import parse_config  # noqa: E402

PY = ROOT / ".venv" / "bin" / "python"
EXPERIMENT = "diffbir-demo"
ARCHIVE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # scikit-image's, small crops


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workdir: str = Field("runs/demo", description="everything the demo writes (removed first when it exists)")
    ray_port: int = Field(6390, description="Ray head GCS port (127.0.0.1)")
    dashboard_port: int = Field(8265, description="Ray dashboard and job API port")
    mlflow_port: int = Field(5005, description="MLflow server port")
    serve_port: int = Field(8000, description="Ray Serve HTTP port")
    rm_steps: int = Field(300, ge=1, description="tiny RM training steps (300: it beats its LQ inputs)")
    gm_steps: int = Field(20, ge=1, description="tiny GM training steps")
    restore_steps: int = Field(4, ge=1, description="sampling steps of the demo restorations")
    timeout_s: int = Field(600, ge=30, description="longest any one step may take")
    hold: bool = Field(False, description="keep the services up after the loop until Ctrl-C, to look around")


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.work = (ROOT / cfg.workdir).resolve()
        self.timings: dict[str, float] = {}
        # each step's `make` gets its own variables, not those `make demo` was given (make
        # passes them on in MAKEFLAGS and exports them)
        dropped = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS", "CONFIG", "IN", "OUT"}
        inherited = {k: v for k, v in os.environ.items() if k not in dropped}
        self.env = {
            **inherited,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray on 127.0.0.1 only
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{cfg.mlflow_port}",
            "DIFFBIR_MODEL_CACHE": str(self.work / "model-cache"),
        }

    # -- processes ---------------------------------------------------------------------------

    @contextmanager
    def background(self, name: str, cmd: list[str], ready_url: str):
        """A long-running process (own process group, log in workdir) until the block ends."""
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_for(ready_url, proc, name, self.cfg.timeout_s, self.work / f"{name}.log")
            yield proc
        finally:
            stop(proc)
            log.close()

    def step(self, name: str, cmd: list[str]) -> None:
        print(f"\n==> {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=self.env, check=True, timeout=self.cfg.timeout_s)
        self.timings[name] = round(time.perf_counter() - t, 1)
        print(f"<== {name}: {self.timings[name]:.0f} s", flush=True)

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        cfg, work = self.cfg, self.work
        for port in (cfg.ray_port, cfg.dashboard_port, cfg.mlflow_port, cfg.serve_port):
            check_port_free(port)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        start = time.perf_counter()
        with ExitStack() as stack:
            stack.enter_context(
                self.background(
                    "mlflow",
                    [
                        str(ROOT / ".venv/bin/mlflow"),
                        "server",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(cfg.mlflow_port),
                        "--backend-store-uri",
                        f"sqlite:///{work}/mlflow/mlflow.db",
                        "--artifacts-destination",
                        f"{work}/mlflow/artifacts",
                        "--workers",
                        "1",
                    ],
                    f"http://127.0.0.1:{cfg.mlflow_port}/health",
                )
            )
            stack.enter_context(
                self.background(
                    "ray",
                    [
                        str(ROOT / ".venv/bin/ray"),
                        "start",
                        "--head",
                        "--block",
                        "--node-ip-address",
                        "127.0.0.1",
                        "--port",
                        str(cfg.ray_port),
                        "--dashboard-host",
                        "127.0.0.1",
                        "--dashboard-port",
                        str(cfg.dashboard_port),
                        # logical CPUs: the Serve replica and the archive's actor each hold one, and the
                        # archive's read tasks still need some (2 real cores are shared by time)
                        "--num-cpus",
                        str(max(4, os.cpu_count())),
                        "--disable-usage-stats",
                    ],
                    f"http://127.0.0.1:{cfg.dashboard_port}/api/version",
                )
            )
            self.env["RAY_ADDRESS"] = f"127.0.0.1:{cfg.ray_port}"  # jobs are submitted here, drivers join it
            self.timings["start services"] = round(time.perf_counter() - start, 1)

            laion = work / "laion"
            self.step("filter-laion", ["make", "filter-laion", f"OUTPUT={laion}"])
            self.step("example data", ["make", "example-data"])
            val = ROOT / "runs/data/example/val"  # held-out photos: validation and promotion
            paths = f"--data {laion}/shards --val-data {val} --storage {work}/train --experiment {EXPERIMENT}"
            self.step("train-rm (ray job)", ["make", "train-rm", f"ARGS={paths} --steps {cfg.rm_steps}"])
            learned = self.rm_metrics()
            self.step(
                "train-gm (ray job)",
                ["make", "train-gm", f"RM_MODEL={work}/train/rm-tiny/model", f"ARGS={paths} --steps {cfg.gm_steps}"],
            )
            self.step("promote", ["make", "promote", f"ARGS=--heldout {val}"])

            defaults = json.dumps({"steps": cfg.restore_steps, "min_side": 64, "sampler": "dpmpp_2m"})
            t = time.perf_counter()
            stack.enter_context(
                self.background(
                    "serve",
                    [
                        "make",
                        "serve",
                        f"ARGS=--port {cfg.serve_port} --reload-interval-s 0 --defaults '{defaults}'",
                    ],
                    f"http://127.0.0.1:{cfg.serve_port}/healthz",
                )
            )
            self.timings["start serving"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            http_out, headers = self.restore_over_http(work)
            self.timings["restore over HTTP"] = round(time.perf_counter() - t, 1)

            archive = write_sample_archive(work / "archive" / "photos.tar.gz")
            restored = work / "archive" / "restored.tar.gz"
            self.step(
                "restore-archive",
                [
                    "make",
                    "restore-archive",
                    f"IN={archive}",
                    f"OUT={restored}",
                    f"ARGS=--steps {cfg.restore_steps} --min-side 64 --sampler dpmpp_2m --task sr --upscale 2",
                ],
            )
            self.timings["total"] = round(time.perf_counter() - start, 1)
            (work / "timings.json").write_text(json.dumps(self.timings, indent=1))
            print(summary(cfg, work, http_out, headers, restored, learned), flush=True)
            if cfg.hold:
                print("services stay up until Ctrl-C", flush=True)
                while True:
                    time.sleep(3600)

    def rm_metrics(self) -> dict[str, float]:
        """The trained RM's last held-out metrics, and its LQ inputs', from its MLflow run."""
        from mlflow import MlflowClient

        client = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'rm-tiny'", max_results=1)
        metrics = runs[0].data.metrics
        learned = {k: metrics[k] for k in ("val/psnr", "val/psnr_lq", "val/ssim", "val/ssim_lq")}
        print(
            f"\n==> the RM on the held-out photos: PSNR {learned['val/psnr']:.2f} dB "
            f"(its LQ inputs {learned['val/psnr_lq']:.2f} dB), SSIM {learned['val/ssim']:.3f} "
            f"(LQ {learned['val/ssim_lq']:.3f})",
            flush=True,
        )
        return learned

    def restore_over_http(self, work: Path) -> tuple[Path, dict]:
        """POST one real photo to /v1/restore, as any client would."""
        import numpy as np
        from PIL import Image
        from skimage import data

        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(data.chelsea()[::4, ::4])).save(buf, "PNG")  # 113 x 75
        url = f"http://127.0.0.1:{self.cfg.serve_port}/v1/restore?task=sr&upscale=2&seed=7"
        request = urllib.request.Request(url, data=buf.getvalue(), headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
            out = work / "restored_http.png"
            out.write_bytes(response.read())
            headers = {k: response.headers[k] for k in ("X-Model-Name", "X-Model-Version", "X-Seed", "X-Batch-Size")}
        print(f"\n==> POST /v1/restore: {out} {headers}", flush=True)
        return out, headers


def write_sample_archive(path: Path) -> Path:
    """A tar.gz of small crops of real photos (scikit-image's), in folders."""
    import numpy as np
    from PIL import Image
    from skimage import data

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(ARCHIVE_PHOTOS):
            img = getattr(data, name)()
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(img[::4, ::4, :3])).save(buf, "PNG")
            member = tarfile.TarInfo(f"{'cats' if name == 'chelsea' else 'misc'}/{i:02d}_{name}.png")
            member.size = len(buf.getvalue())
            tar.addfile(member, io.BytesIO(buf.getvalue()))
    return path


def summary(cfg: DemoConfig, work: Path, http_out: Path, headers: dict, restored: Path, learned: dict) -> str:
    stem = str(restored).removesuffix(".tar.gz")
    gain = learned["val/psnr"] - learned["val/psnr_lq"]
    verdict = "beats" if gain > 0 else "does NOT beat (train longer: --rm-steps)"
    return f"""
The platform ran end to end in {cfg_time(work)}. What was learned: the RM, trained on the
filtered sample, {verdict} its LQ inputs on the held-out photos: PSNR {learned["val/psnr"]:.2f} dB vs \
{learned["val/psnr_lq"]:.2f} dB ({gain:+.2f} dB), SSIM {learned["val/ssim"]:.3f} vs {learned["val/ssim_lq"]:.3f}.
Where to look:
  MLflow runs and registry   http://127.0.0.1:{cfg.mlflow_port}
                             (later: .venv/bin/mlflow server --port {cfg.mlflow_port}
                               --backend-store-uri sqlite:///{work}/mlflow/mlflow.db
                               --artifacts-destination {work}/mlflow/artifacts)
  Ray dashboard (jobs)       http://127.0.0.1:{cfg.dashboard_port}
  filtered shards + report   {work}/laion/shards/, {work}/laion/stats.md, {work}/laion/score_histograms.png
  training checkpoints       {work}/train/
  restored over HTTP         {http_out}
                             (model {headers.get("X-Model-Name")} v{headers.get("X-Model-Version")}, \
seed {headers.get("X-Seed")})
  restored archive           {restored}, manifest {stem}.manifest.csv
  contact sheet              {stem}.contact.html, {stem}.contact.png (LQ | stage 1 | final)
  step timings               {work}/timings.json
The tiny SD 2.1 here has the reference's random weights (diffbir init-tiny), and 20 GM steps
do not teach it to draw photos: its final images are noise, while the stage-1 column shows the
trained RM at work. With the official weights (README: "Bringing the official weights") the
same commands restore photos.
"""


def cfg_time(work: Path) -> str:
    total = json.loads((work / "timings.json").read_text())["total"]
    return f"{total // 60:.0f} min {total % 60:.0f} s"


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"demo: port {port} on 127.0.0.1 is in use; pick another in the config (--help)")


def wait_for(url: str, proc: subprocess.Popen, name: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {name} exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:  # it answers (the dashboard wants a token): it is up
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {name} not ready after {timeout} s; see {log}") from None
            time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (Ray's head stops the processes it started), SIGKILL if stuck."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    cfg = parse_config(DemoConfig, argv, __doc__.split("\n")[0], default_config=ROOT / "infra/configs/demo.yaml")
    try:
        Demo(cfg).run()
    except subprocess.CalledProcessError as e:
        print(f"demo: step failed ({e.cmd[:3]}...): exit {e.returncode}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: stopped; everything it started is stopped too", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
