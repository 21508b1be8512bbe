"""The model registry that training, promotion and serving share (MLflow 3).

A model version is a platform model directory (model.json + <part>.safetensors) logged as an
MLflow logged model (`models:/m-<id>`, kept under the training run's experiment) and registered
under a name. Versions are only ever added; which one serves is said by aliases
(`models:/diffbir@champion`), not by the deprecated stages.

Serving loads exactly one version even while the alias moves:

    info = version_info("models:/diffbir@champion")   # which version the alias names now
    model_dir = resolve(info["uri"])                   # that version (models:/diffbir/<n>), cached
    ...
    if alias_version("diffbir", "champion") != info["version"]:  # poll: the alias moved
        ...reload

Promotion moves an alias with `move_alias`, a compare-and-set: it moves only if the alias still
names the version the candidate was compared against. MLflow updates aliases unconditionally, so
the check and the move hold a lock, a registered model `<LOCK_PREFIX><name>@<alias>`: creating a
registered model is atomic in every MLflow store (its name is unique), deleting it releases.

Every function here talks to the store `configure()` (or MLFLOW_TRACKING_URI) points MLflow at.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from diffbir.checkpoints.platform import is_model_dir, read_manifest

DEFAULT_DIR = "runs/mlflow"  # the embedded store (runs/ is git-ignored)
CACHE_ENV = "DIFFBIR_MODEL_CACHE"  # where downloaded versions are kept (default ~/.cache/diffbir/models)
MAX_TAG_LENGTH = 100_000  # MLflow's limit for a registry tag value
_MODELS_URI = re.compile(r"models:/(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))")
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or a platform model directory"
LOCK_PREFIX = "_lock."  # registered models named so are alias locks, not models
LOCK_LEASE_S = 120.0  # a lock older than this was left by a holder that died: it may be broken
LOCK_WAIT_S = 30.0  # how long move_alias waits for another holder (which holds it for milliseconds)


class RegistryError(Exception):
    """A registry request that cannot be met: unknown model, version or alias, or a bad URI."""


class AliasMovedError(RegistryError):
    """move_alias found the alias naming another version than the one expected."""

    def __init__(self, name: str, alias: str, expected: str | None, current: str | None):
        self.current = current
        super().__init__(f"@{alias} of '{name}' now names {_named(current)}, not {_named(expected)}")


def tracking_uri(default_dir: str | Path = DEFAULT_DIR) -> str:
    """MLFLOW_TRACKING_URI when set (a server at scale), else a SQLite store in `default_dir`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(default_dir).resolve() / 'mlflow.db'}"


def configure(default_dir: str | Path = DEFAULT_DIR) -> str:
    """Point this process's MLflow at the store and return its URI. Process-wide on purpose:
    MLflow's registry looks logged models up through the global tracking URI, whatever client
    asks it. MLflow also exports it as MLFLOW_TRACKING_URI, so subprocesses (Ray workers) and
    later calls in this process use the same store."""
    uri = tracking_uri(default_dir)
    if db := _sqlite_path(uri):
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_id(name: str) -> str:
    """The experiment `name`, created when missing. On a SQLite store its artifacts go beside
    the database (<dir>/artifacts); MLflow's default would be ./mlruns in the working directory."""
    client = MlflowClient()
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    db = _sqlite_path(mlflow.get_tracking_uri())
    try:
        return client.create_experiment(name, artifact_location=(db.parent / "artifacts").as_uri() if db else None)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else another process created it first
            raise
        return client.get_experiment_by_name(name).experiment_id


def register_model(
    run_id: str,
    model_dir: str | Path,
    name: str,
    metrics: dict[str, float] | None = None,
    lineage: dict | None = None,
) -> str:
    """Log `model_dir` as a logged model of run `run_id`, register it as a new version of `name`
    and return the version number. The version's tags say where it came from: `lineage.run_id`,
    `lineage.<key>` per lineage entry (data shards, config hash, ...; non-strings as JSON) and
    `metric.<key>` per metric."""
    read_manifest(model_dir)  # refuse anything but a platform model before writing anything
    tags = {"lineage.run_id": run_id}
    tags |= {f"lineage.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (lineage or {}).items()}
    tags |= {f"metric.{k}": repr(float(v)) for k, v in (metrics or {}).items()}
    if long := [k for k, v in tags.items() if len(v) > MAX_TAG_LENGTH]:
        raise ValueError(f"tags {long} exceed MLflow's {MAX_TAG_LENGTH} characters (give shards as a brace pattern)")
    client = MlflowClient()
    run = client.get_run(run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id, model_type="diffbir-platform"
    )
    try:
        client.log_model_artifacts(model.model_id, str(model_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(name, model.model_uri, run_id=run_id, tags=tags, model_id=model.model_id)
    return str(mv.version)


def resolve(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local platform model directory for `uri` (see URI_FORMS). A registry version is
    downloaded once into <cache>/<store>/<name>/<version>: versions never change, so a cached
    copy never goes stale. An alias is looked up anew on every call."""
    if not str(uri).startswith("models:/"):
        return _local_dir(uri)
    mv, _ = _model_version(str(uri))
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffbir" / "models")
    store = hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:12]  # stores reuse names
    target = root / store / mv.name / str(mv.version)
    if not is_model_dir(target):
        _download(f"models:/{mv.name}/{mv.version}", target)
    return target


def version_info(uri: str | Path) -> dict:
    """What `uri` names now: name, version, alias, aliases, run_id, source, tags and `uri`, the
    pinned models:/<name>/<version> to load. A local directory has no version or run."""
    if not str(uri).startswith("models:/"):
        path = _local_dir(uri)
        local = str(path)
        return dict(name=path.name, version=None, alias=None, aliases=[], run_id=None, source=local, tags={}, uri=local)
    mv, alias = _model_version(str(uri))
    return dict(
        name=mv.name,
        version=str(mv.version),
        alias=alias,
        aliases=list(mv.aliases),
        run_id=mv.run_id,
        source=mv.source,
        tags=dict(mv.tags),
        uri=f"models:/{mv.name}/{mv.version}",
    )


def set_alias(name: str, alias: str, version: str) -> None:
    """Point `alias` at `version` (moving it if it named another version)."""
    client = MlflowClient()
    _version(client, name, str(version))  # a clear error for an unknown model or version
    client.set_registered_model_alias(name, alias, str(version))


def move_alias(name: str, alias: str, version: str, expected: str | None) -> None:
    """Compare-and-set: point `alias` at `version` only if it still names `expected` (None: no
    version); else raise AliasMovedError and change nothing."""
    with _alias_lock(name, alias):
        current = alias_version(name, alias)
        if current != expected:
            raise AliasMovedError(name, alias, expected, current)
        set_alias(name, alias, version)


def set_tags(name: str, version: str, tags: dict[str, str]) -> None:
    """Add tags to a version (a tag of the same key is replaced)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)


def alias_version(name: str, alias: str) -> str | None:
    """The version `alias` names, None when it names none (cheap enough to poll)."""
    version = _registered_model(MlflowClient(), name).aliases.get(alias)
    return None if version is None else str(version)


def latest_version(name: str) -> str:
    """The newest version of `name`."""
    client = MlflowClient()
    _registered_model(client, name)
    versions = [int(mv.version) for mv in client.search_model_versions(f"name = '{name}'")]
    if not versions:
        raise RegistryError(f"registered model '{name}' has no versions")
    return str(max(versions))


def _named(version: str | None) -> str:
    return f"v{version}" if version else "no version"


@contextmanager
def _alias_lock(name: str, alias: str) -> Iterator[None]:
    """Hold the lock of `name@alias`: wait while another holder has it, break it when its lease ran out."""
    client = MlflowClient()
    lock = f"{LOCK_PREFIX}{name}@{alias}"
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _try_lock(client, lock):
        if time.monotonic() > deadline:
            raise RegistryError(
                f"@{alias} of '{name}' is locked by another alias move (registered model '{lock}'); "
                f"it is released when that move ends, or after {LOCK_LEASE_S:.0f} s if its process died"
            )
        time.sleep(0.1)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _try_lock(client: MlflowClient, lock: str) -> bool:
    try:
        client.create_registered_model(lock, tags={"expires": repr(time.time() + LOCK_LEASE_S)})
        return True
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    try:
        expired = float(client.get_registered_model(lock).tags.get("expires", 0)) < time.time()
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False  # released meanwhile: try again
    if expired:  # its holder died holding it (clocks of the hosts agree to well within the lease)
        client.delete_registered_model(lock)
    return False


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def _local_dir(uri: str | Path) -> Path:
    path = Path(uri)
    if not is_model_dir(path):
        raise RegistryError(f"{uri}: not a platform model directory (no model.json); expected {URI_FORMS}")
    return path


def _registered_model(client: MlflowClient, name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        models = (m.name for m in client.search_registered_models())
        known = ", ".join(sorted(n for n in models if not n.startswith(LOCK_PREFIX))) or "none"
        raise RegistryError(f"no registered model named '{name}' (registered: {known})") from e


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    _registered_model(client, name)
    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(f"registered model '{name}' has no version {version}") from e


def _model_version(uri: str) -> tuple[ModelVersion, str | None]:
    """The version a models:/ URI names, and the alias it was named by."""
    m = _MODELS_URI.fullmatch(uri)
    if m is None:
        raise RegistryError(f"{uri!r}: expected {URI_FORMS}")
    client = MlflowClient()
    name, alias, version = m["name"], m["alias"], m["version"]
    if alias is not None:
        version = _registered_model(client, name).aliases.get(alias)
        if version is None:
            raise RegistryError(f"registered model '{name}' has no alias '{alias}'")
    return _version(client, name, str(version)), alias


def _download(uri: str, target: Path) -> None:
    """Download into a temporary directory beside `target`, then rename it into place, so a
    concurrent or interrupted download never leaves a partial model where a reader looks."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
        if not is_model_dir(tmp):
            raise RegistryError(f"{uri}: its artifacts are not a platform model directory (no model.json)")
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_model_dir(target):  # else another process put the same version there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
