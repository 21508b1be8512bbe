"""The DiffBIR restoration API on Ray Serve: one deployment whose replicas each load the model
once (by registry URI), group concurrent requests into batches (`@serve.batch`) and answer over
a FastAPI ingress. Its OpenAPI schema is at /openapi.json, interactive docs at /docs.

    python -m serving.app --config serving/configs/serve.yaml       # make serve
    serve run serving/configs/serve_deploy.yaml                     # the same app, Serve's CLI

A replica serves the version the alias named when it loaded. It looks again every
`reload_interval_s` and on POST /v1/reload, loads a new version beside the old one and swaps:
batches already running finish on the old one and say so in their headers.
"""

# No `from __future__ import annotations` here: Serve rebuilds the route methods' signatures in
# its own module, where FastAPI could not resolve string annotations (Request would become a query).
import asyncio
import hmac
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from diffbir.config import load_config
from diffbir.image_io import ImageError, decode_image, encode_image
from diffbir.pipeline import RestoreOptions
from pipelines.ray_env import ensure_ray
from serving.config import ServeConfig, parse_config
from serving.limits import (
    FORMAT_NAMES,
    OUTPUT_TYPES,
    ApiError,
    check_image_header,
    check_work_size,
    negotiate,
    read_body,
    restore_options,
    split_upload,
)
from serving.model import BatchStats, Job, ServedModel, load_served_model
from training import registry

STATIC = Path(__file__).with_name("static")
logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="DiffBIR restoration API",
    version="1",
    description="Blind image restoration (super-resolution, face, denoise) with DiffBIR. Errors are JSON: "
    '`{"error": code, "message": text, "field": first bad field, "errors": [{"field", "message"}]}`.',
)
bearer = HTTPBearer(auto_error=False, description="the server's token (config auth_token or $DIFFBIR_SERVE_TOKEN)")


def _option_parameters() -> list[dict]:
    """RestoreOptions fields as documented query parameters (they are parsed by hand, after the
    body size check, so FastAPI does not list them itself)."""
    schema = RestoreOptions.model_json_schema()
    return [
        {"name": name, "in": "query", "required": False, "schema": prop, "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]


BINARY = {"type": "string", "format": "binary"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {}}}


RESTORE_DOC = dict(
    summary="Restore one image",
    description="The image comes as the raw body or as the `file` field of a multipart form; options as query "
    "parameters (or, in a multipart form, fields of the same names, which win). A seed not given is drawn at "
    "random; `X-Seed` says which was used. The output has the input's size times `upscale` and its form "
    "(grayscale, alpha, 16-bit PNG); its type follows `Accept`: " + ", ".join(OUTPUT_TYPES) + ".",
    response_class=Response,
    responses={
        200: {
            "description": "the restored image",
            "content": {t: {"schema": BINARY} for t in OUTPUT_TYPES},
            "headers": {
                h: {"description": d, "schema": {"type": "string"}}
                for h, d in [
                    ("X-Model-Name", "registered model name"),
                    ("X-Model-Version", "the version that restored this image ('local' for a directory)"),
                    ("X-Model-URI", "the pinned models:/<name>/<version> (or directory)"),
                    ("X-Seed", "the sampling seed used"),
                    ("X-Batch-Size", "requests restored in the same batch"),
                ]
            },
        },
        400: _error("malformed multipart body"),
        401: _error("missing or wrong bearer token"),
        406: _error("no acceptable output type"),
        413: _error("body or image too large (checked on the header, before decoding)"),
        415: _error(f"not an image, or not one of {', '.join(FORMAT_NAMES)}"),
        422: _error("bad option (the field is named), no image, or truncated/corrupt image data"),
    },
    openapi_extra={
        "parameters": _option_parameters(),
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": ["file"], "properties": {"file": BINARY}}
                },
                **{f"image/{t.lower()}": {"schema": BINARY} for t in FORMAT_NAMES},
                "application/octet-stream": {"schema": BINARY},
            },
        },
    },
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown path, wrong method) in the same JSON shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse({"error": code, "message": str(e.detail)}, status_code=e.status_code, headers=e.headers)


@dataclass(frozen=True)
class Restored:
    image: np.ndarray | Exception
    model: ServedModel
    batch_size: int


@serve.deployment
@serve.ingress(api)
class RestorationService:
    def __init__(self, config: dict, tracking_uri: str):
        self.cfg = ServeConfig(**config)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the store the app builder chose
        registry.configure()
        self.model = load_served_model(self.cfg, registry.version_info(self.cfg.model_uri))
        self.stats = BatchStats()
        self._reload_lock = asyncio.Lock()
        self._restore_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._restore_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        if self.cfg.reload_interval_s:  # Serve runs the constructor on the replica's event loop
            self._poller = asyncio.get_running_loop().create_task(self._follow_alias())
        logger.info("serving %s v%s from %s", self.cfg.model_uri, self.model.version, self.model.info["uri"])

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        token = self.cfg.auth_token
        if token and not (credentials and hmac.compare_digest(credentials.credentials.encode(), token.encode())):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @api.get("/healthz", summary="Liveness and the version served (no token needed)")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.model.version}

    @api.get("/v1/model", summary="The model this replica serves: version, URIs, lineage tags, part configs")
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        self._authorize(credentials)
        return {"requested_uri": self.cfg.model_uri, **self.model.describe(), "defaults": self.cfg.defaults}

    @api.get(
        "/v1/stats", summary="This replica's batches: sizes seen, pipeline calls, restore time, requests restoring now"
    )
    async def stats_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        self._authorize(credentials)
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.stats.summary()}

    @api.post(
        "/v1/reload",
        summary="Load the version the configured URI names now (after the alias moved)",
        responses={
            401: _error("missing or wrong bearer token"),
            409: _error("the registry cannot resolve the model URI"),
        },
    )
    async def reload(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        """Reloads this replica; other replicas follow within reload_interval_s (or redeploy)."""
        self._authorize(credentials)
        previous = self.model.version
        try:
            changed = await self._refresh()
        except registry.RegistryError as e:
            raise ApiError(409, "registry_error", f"{e}; still serving v{previous}") from e
        return {"previous": previous, "version": self.model.version, "uri": self.model.info["uri"], "changed": changed}

    @api.post("/v1/restore", **RESTORE_DOC)
    async def restore(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Response:
        self._authorize(credentials)
        media_type = negotiate(request.headers.get("accept"))
        body = await read_body(request.headers, request.stream(), self.cfg.max_body_bytes)
        data, form = await split_upload(request.headers, body)
        fields = {**request.query_params, **form}
        if "seed" not in fields and "seed" not in self.cfg.defaults:
            fields["seed"] = str(secrets.randbelow(2**31))
        opts = restore_options(fields, self.cfg.defaults, self.cfg.max_steps)
        width, height = check_image_header(data, self.cfg.max_input_pixels)
        check_work_size(width, height, opts, self.cfg.max_work_pixels)
        try:
            image, info = await asyncio.to_thread(decode_image, data, "upload", self.cfg.max_input_pixels)
        except ImageError as e:
            raise ApiError(422, "corrupt_image", str(e)) from e
        result = await self._restore_batch(Job(image, opts))
        if isinstance(result.image, Exception):
            logger.error("restoration failed: %r", result.image)
            return JSONResponse({"error": "restoration_failed", "message": str(result.image)}, status_code=500)
        encoded = await asyncio.to_thread(encode_image, result.image, info, OUTPUT_TYPES[media_type])
        model = result.model
        headers = {
            "X-Model-Name": model.info["name"],
            "X-Model-Version": model.version,
            "X-Model-URI": model.info["uri"],
            "X-Seed": str(opts.seed),
            "X-Batch-Size": str(result.batch_size),
            "Content-Disposition": f'inline; filename="restored{OUTPUT_TYPES[media_type]}"',
            "Vary": "Accept",
        }
        return Response(encoded, media_type=media_type, headers=headers)

    @serve.batch  # sizes are set per replica from the config in __init__
    async def _restore_batch(self, jobs: list[Job]) -> list[Restored]:
        model = self.model  # a reload during this batch swaps self.model, not this one
        images, options = [j.image for j in jobs], [j.options for j in jobs]
        start = time.perf_counter()
        self.stats.restoring = len(jobs)
        try:
            results = await asyncio.to_thread(model.pipeline.restore_grouped, images, options)
        finally:
            self.stats.restoring = 0
        self.stats.record(len(jobs), len(model.pipeline.canvas_groups(images, options)), time.perf_counter() - start)
        return [Restored(result, model, len(jobs)) for result in results]

    async def _refresh(self) -> bool:
        """Load what cfg.model_uri names now when it is another version; True when it was."""
        async with self._reload_lock:
            info = await asyncio.to_thread(registry.version_info, self.cfg.model_uri)
            if info["uri"] == self.model.info["uri"]:
                return False
            model = await asyncio.to_thread(load_served_model, self.cfg, info)
            logger.info("now serving v%s (was v%s)", model.version, self.model.version)
            self.model = model
            return True

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                await self._refresh()
            except Exception:
                logger.exception("checking %s failed; still serving v%s", self.cfg.model_uri, self.model.version)


def build(cfg: ServeConfig) -> serve.Application:
    """The Serve application for `cfg`; the token, paths and MLflow store as this process sees them."""
    cfg = cfg.for_replicas()
    deployment = RestorationService.options(**cfg.deployment_options())
    return deployment.bind(cfg.model_dump(), registry.tracking_uri(cfg.tracking_dir))


def build_app(args: dict) -> serve.Application:
    """Application builder for Serve's config files and CLI (`import_path: serving.app:build_app`):
    `args` holds ServeConfig fields, and `config`, a YAML file of them that the others override."""
    args = dict(args)
    return build(load_config(ServeConfig, args.pop("config", None), **args))


def run(cfg: ServeConfig) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on cfg.host:cfg.port and deploy; the URL."""
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except (FileNotFoundError, ValueError, ValidationError) as e:
        print(f"serving: error: {e}", file=sys.stderr)
        return 2
    url = run(cfg)
    print(f"serving {cfg.model_uri} at {url} (API docs: {url}docs); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` shuts down as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):  # shut down once, however often asked
            signal.signal(sig, signal.SIG_IGN)
        print("shutting down", flush=True)
    serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
