"""Start or join the Ray cluster every pipeline stage, training run and server runs on."""

from __future__ import annotations

import os
import socket

import ray
from ray._private import ray_constants

_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray binds to 127.0.0.1, not the network address


def loopback_env() -> None:
    """Ray processes started from this one bind to 127.0.0.1 and send no usage reports.

    The Ray processes read these from the environment; this process read the first when ray
    was imported (possibly before this call), hence the constant is set too."""
    os.environ.setdefault(_LOOPBACK, "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(_LOOPBACK, True)


def ensure_ray(num_cpus: int | None = None, include_dashboard: bool = False) -> None:
    """Join the cluster at RAY_ADDRESS if set (a `ray job submit` entrypoint has it), else start
    a local Ray on 127.0.0.1 with `num_cpus` CPUs (default: all of this machine's). Does nothing
    when Ray is already up. The dashboard costs a core's worth of start-up on a small machine;
    Ray Train needs it (its controller watches the workers through the state API it serves)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    loopback_env()
    # address="local" never attaches to another local cluster found in /tmp/ray
    for attempt in range(3):  # a loaded machine can miss Ray's start-up deadlines: try again
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=include_dashboard)
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
