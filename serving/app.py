"""The DiffBIR restoration API on Ray Serve: one deployment whose replicas each load the model
once (by registry URI), group concurrent requests into batches (`@serve.batch`) and answer over
a FastAPI ingress. Its OpenAPI schema is at /openapi.json, interactive docs at /docs (api_docs).

    python -m serving.app --config serving/configs/serve.yaml       # make serve
    serve run serving/configs/serve_deploy.yaml                     # the same app, Serve's CLI

A replica serves the version the alias named when it loaded. It looks again every
`reload_interval_s` and on POST /v1/reload, loads a new version beside the old one and swaps:
batches already running finish on the old one and say so in their headers.
"""

# No `from __future__ import annotations` here: Serve rebuilds the route methods' signatures in
# its own module, where FastAPI could not resolve string annotations (Request would become a query).
import asyncio
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import get_args
from urllib.parse import quote, urlsplit

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from diffbir.captioning import Caption
from diffbir.config import load_config
from diffbir.image_io import ImageError, decode_image, encode_image
from diffbir.pipeline import RestoreOptions, plan_sizes
from diffbir.presets import PRESETS
from pipelines.ray_env import ensure_ray
from serving.config import ServeConfig, parse_config
from serving.limits import (
    FORMAT_NAMES,
    OUTPUT_TYPES,
    ApiError,
    check_image_header,
    check_work,
    invalid,
    negotiate,
    read_body,
    restore_options,
    split_upload,
)
from serving.model import (
    BatchStats,
    DeadlineError,
    Job,
    ProgressBoard,
    ServedModel,
    Watchdog,
    load_served_model,
    public_uri,
    restore_isolated,
)
from training import registry

STATIC = Path(__file__).with_name("static")
logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="DiffBIR restoration API",
    version="1",
    description="Blind image restoration (super-resolution, face, denoise) with DiffBIR. Errors are JSON: "
    '`{"error": code, "message": text, "field": first bad field, "errors": [{"field", "message"}]}`.',
    docs_url=None,  # /docs only where api_docs enables it (Swagger UI loads its scripts from a CDN)
    redoc_url=None,
)
api.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's example images
bearer = HTTPBearer(auto_error=False, description="the server's token (auth_token_file or $DIFFBIR_SERVE_TOKEN)")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CAPTION_HEADER_CHARS = 1000  # X-Caption and X-Caption-Error carry at most this much of their text
HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")  # a client's X-Request-Id: random, so no one else's to guess
# the ServeConfig limits a client may want to know before it sends (GET /info)
REQUEST_LIMITS = (
    "max_body_bytes",
    "max_input_pixels",
    "max_output_pixels",
    "max_work_pixels",
    "max_upscale",
    "max_steps",
    "max_guidance_repeat",
    "max_tile_size",
    "max_tiles",
    "max_prompt_chars",
    "request_timeout_s",
)


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
                    ("X-Caption", "the captioner's caption that led the prompt (percent-encoded; servers with one)"),
                    ("X-Caption-Error", "why the captioner gave none (the default prompt was used; percent-encoded)"),
                ]
            },
        },
        400: _error("malformed multipart body"),
        401: _error("missing or wrong bearer token"),
        403: _error("a browser's cross-site request (its Origin is not this server)"),
        406: _error("no acceptable output type"),
        413: _error("body or image too large (checked on the header, before decoding)"),
        415: _error(f"not an image, or not one of {', '.join(FORMAT_NAMES)}"),
        422: _error("bad option or one over the server's limits (the field is named), no image, or corrupt data"),
        500: _error("restoration failed; the message holds an error id for the server's log"),
        503: _error("the replica holds as many images as it may, or the queue is full: retry after Retry-After"),
        504: _error("not restored within the server's request_timeout_s"),
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
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else e.headers
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    return internal_error(e)


def internal_error(e: BaseException) -> JSONResponse:
    """A 500 that tells the client only an id; the detail goes to the log under it."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("error %s: %r", error_id, e, exc_info=e)
    message = f"internal error (error id {error_id})"
    return JSONResponse({"error": "internal_error", "message": message, "error_id": error_id}, status_code=500)


@api.middleware("http")
async def _refuse_cross_site_writes(request: Request, call_next):
    """A browser sends Origin with every cross-site POST (a form on another site included); only
    this server's own page may write. Clients that are not browsers send no Origin."""
    origin = request.headers.get("origin")
    cross_site = origin is not None and urlsplit(origin).netloc != request.headers.get("host")
    if request.method not in SAFE_METHODS and cross_site:
        message = f"cross-site request from {origin!r} refused: call the API from this server's page or without Origin"
        return JSONResponse({"error": "cross_origin", "message": message}, status_code=403)
    return await call_next(request)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (unknown path, wrong method) in the same JSON shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse({"error": code, "message": str(e.detail)}, status_code=e.status_code, headers=e.headers)


# Helpers of the deployment class live above it: Serve pickles the class where it is decorated.
def _same_secret(given: str, token: str) -> bool:
    """Constant time whatever the lengths: compare digests, not the strings."""
    digest = lambda text: hashlib.sha256(text.encode()).digest()  # noqa: E731
    return hmac.compare_digest(digest(given), digest(token))


def _request_id(value: str | None) -> str | None:
    if value is not None and not REQUEST_ID.fullmatch(value):
        raise invalid("X-Request-Id", "8 to 64 letters, digits, '-' or '_' (a random id the client made)")
    return value


def header_text(text: str, limit: int = CAPTION_HEADER_CHARS) -> str:
    """`text` (its first `limit` characters) as a header value: printable ASCII but '%' kept,
    everything else percent-encoded UTF-8 (urllib.parse.unquote reads it back)."""
    return quote(text[:limit], safe=HEADER_SAFE)


@dataclass(frozen=True)
class Restored:
    image: np.ndarray | Exception
    model: ServedModel
    batch_size: int
    caption: Caption = Caption()


@serve.deployment
@serve.ingress(api)
class RestorationService:
    def __init__(self, config: dict, tracking_uri: str):
        self.cfg = ServeConfig(**config)
        self.token = self.cfg.auth_token()  # from this node's file or environment, never the deployment's args
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri  # the store the app builder chose
        registry.configure()
        self.watchdog = Watchdog(grace_s=self.cfg.request_timeout_s)
        self.model = load_served_model(self.cfg, registry.version_info(self.cfg.model_uri), self.watchdog)
        self.stats = BatchStats()
        self.progress = ProgressBoard()
        self.held_pixels = 0  # decoded inputs and outputs of the requests in this replica
        self._reload_lock = asyncio.Lock()
        self._restore_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._restore_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        if self.cfg.reload_interval_s:  # Serve runs the constructor on the replica's event loop
            self._poller = asyncio.get_running_loop().create_task(self._follow_alias())
        logger.info("serving %s v%s from %s", self.cfg.model_uri, self.model.version, self.model.info["uri"])

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token and not (credentials and _same_secret(credentials.credentials, self.token)):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes it replace the replica."""
        if self.watchdog.hung():
            raise RuntimeError("a model call has run far past its deadline: the replica hangs")

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> Response:
        if not self.cfg.api_docs:
            raise HTTPException(404, "Not Found")
        return get_swagger_ui_html(openapi_url="openapi.json", title=api.title)

    @api.get("/healthz", summary="Liveness and the version served (no token needed)")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_version": self.model.version}

    @api.get("/info", summary="What a client may ask for: the model, tasks, presets and limits (no token needed)")
    async def info(self) -> dict:
        """What the web page offers: the model it will use (name, registry version, the DiffBIR
        release whose preset applies when none is chosen), the tasks and presets, this server's limits."""
        model = self.model
        return {
            "model": {"name": model.info["name"], "version": model.version, "release": model.pipeline.bundle.version},
            "tasks": list(get_args(RestoreOptions.model_fields["task"].annotation)),
            "presets": list(PRESETS),
            "formats": FORMAT_NAMES,
            "limits": {name: getattr(self.cfg, name) for name in REQUEST_LIMITS},
            "token_required": self.token is not None,
        }

    @api.get(
        "/v1/progress/{request_id}",
        summary="Where the restoration sent with this X-Request-Id stands",
        responses={404: _error("no such request on this replica (not yet arrived, long done, or another replica's)")},
    )
    async def progress_info(
        self, request_id: str, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> dict:
        """{stage, steps_done, steps_total}; stage: queued, restoring (steps counting), encoding, done
        or failed. Kept by the replica restoring it (see serving.model.ProgressBoard)."""
        self._authorize(credentials)
        entry = self.progress.get(_request_id(request_id))
        if entry is None:
            raise ApiError(404, "unknown_request", f"no request {request_id} on this replica")
        return entry

    @api.get("/v1/model", summary="The model this replica serves: version, URIs, lineage tags, part configs")
    async def model_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        self._authorize(credentials)
        requested = public_uri(self.cfg.model_uri)
        return {"requested_uri": requested, **self.model.describe(), "defaults": self.cfg.defaults}

    @api.get(
        "/v1/stats", summary="This replica's batches: sizes seen, pipeline calls, restore time, requests restoring now"
    )
    async def stats_info(self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        self._authorize(credentials)
        cache = {"text_contexts": len(self.model.pipeline.contexts), "held_pixels": self.held_pixels}
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.stats.summary(), **cache}

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
        return {"previous": previous, "version": self.model.version, "uri": self.model.public_uri, "changed": changed}

    @api.post("/v1/restore", **RESTORE_DOC)
    async def restore(
        self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> Response:
        self._authorize(credentials)
        deadline = time.monotonic() + self.cfg.request_timeout_s
        request_id = _request_id(request.headers.get("x-request-id"))
        outcome = "failed"
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                response = await self._restore(request, deadline, request_id)
            outcome = "done" if response.status_code == 200 else "failed"
            return response
        except TimeoutError as e:
            raise self._timed_out() from e
        finally:
            self.progress.set(request_id, outcome)

    def _timed_out(self) -> ApiError:
        return ApiError(504, "timeout", f"not restored within request_timeout_s ({self.cfg.request_timeout_s:g} s)")

    async def _restore(self, request: Request, deadline: float, request_id: str | None) -> Response:
        media_type = negotiate(request.headers.get("accept"))
        body = await read_body(request.headers, request.stream(), self.cfg.max_body_bytes)
        data, form = await split_upload(request.headers, body)
        fields = {**request.query_params, **form}
        if "seed" not in fields and "seed" not in self.cfg.defaults:
            fields["seed"] = str(secrets.randbelow(2**31))
        opts = self.model.pipeline.options(restore_options(fields, self.cfg.defaults))
        width, height = check_image_header(data, self.cfg.max_input_pixels)
        check_work(width, height, opts, self.cfg)
        (out_h, out_w), _ = plan_sizes(height, width, opts.scale, opts.min_side)
        with self._holding(width * height + out_h * out_w):
            self.progress.set(request_id, "queued", 0, opts.steps)
            try:
                image, info = await asyncio.to_thread(decode_image, data, "upload", self.cfg.max_input_pixels)
            except ImageError as e:
                raise ApiError(422, "corrupt_image", str(e)) from e
            result = await self._restore_batch(Job(image, opts, deadline, request_id))
            if isinstance(result.image, DeadlineError):
                raise self._timed_out()
            if isinstance(result.image, Exception):
                return internal_error(result.image)
            self.progress.set(request_id, "encoding")
            encoded = await asyncio.to_thread(encode_image, result.image, info, OUTPUT_TYPES[media_type])
        model = result.model
        headers = {
            "X-Model-Name": model.info["name"],
            "X-Model-Version": model.version,
            "X-Model-URI": model.public_uri,
            "X-Seed": str(opts.seed),
            "X-Batch-Size": str(result.batch_size),
            "Content-Disposition": f'inline; filename="restored{OUTPUT_TYPES[media_type]}"',
            "Vary": "Accept",
        }
        if result.caption.text:
            headers["X-Caption"] = header_text(result.caption.text)
        if result.caption.error:
            headers["X-Caption-Error"] = header_text(result.caption.error)
        return Response(encoded, media_type=media_type, headers=headers)

    @contextmanager
    def _holding(self, pixels: int) -> Iterator[None]:
        """Reserve `pixels` of the replica's max_held_pixels for one request's decoded input and
        output (12 bytes each as float32), or refuse it with 503 while others hold them."""
        if self.held_pixels + pixels > self.cfg.max_held_pixels:
            retry = {"Retry-After": str(math.ceil(self.cfg.retry_after_s))}
            raise ApiError(503, "busy", "the replica holds as many images as it may; retry later", headers=retry)
        self.held_pixels += pixels
        try:
            yield
        finally:
            self.held_pixels -= pixels

    @serve.batch  # sizes are set per replica from the config in __init__
    async def _restore_batch(self, jobs: list[Job]) -> list[Restored]:
        model = self.model  # a reload during this batch swaps self.model, not this one
        images, options = [j.image for j in jobs], [j.options for j in jobs]
        start = time.perf_counter()
        self.stats.restoring = len(jobs)
        self.watchdog.deadline = max(j.deadline for j in jobs)  # stop only when no request waits any more
        report = self.progress.reporter([j.request_id for j in jobs])
        try:  # the batch Serve formed is captioned in one call, then restored
            captions = await asyncio.to_thread(model.pipeline.caption, images, options)
            results = await asyncio.to_thread(restore_isolated, model.pipeline, images, options, report, captions)
        finally:
            self.watchdog.deadline = math.inf
            self.stats.restoring = 0
        self.stats.record(len(jobs), len(model.pipeline.canvas_groups(images, options)), time.perf_counter() - start)
        return [Restored(result, model, len(jobs), caption) for result, caption in zip(results, captions)]

    async def _refresh(self) -> bool:
        """Load what cfg.model_uri names now when it is another version; True when it was."""
        async with self._reload_lock:
            info = await asyncio.to_thread(registry.version_info, self.cfg.model_uri)
            if info["uri"] == self.model.info["uri"]:
                return False
            captioner = self.model.pipeline.captioner  # one per replica, whatever the version
            model = await asyncio.to_thread(load_served_model, self.cfg, info, self.watchdog, captioner)
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
    """The Serve application for `cfg`; paths and the MLflow store as this process sees them."""
    cfg = cfg.for_replicas()
    deployment = RestorationService.options(**cfg.deployment_options())
    return deployment.bind(cfg.model_dump(), registry.tracking_uri(cfg.tracking_dir))


def build_app(args: dict) -> serve.Application:
    """Application builder for Serve's config files and CLI (`import_path: serving.app:build_app`):
    `args` holds ServeConfig fields, and `config`, a YAML file of them that the others override."""
    args = dict(args)
    return build(load_config(ServeConfig, args.pop("config", None), **args))


def run(cfg: ServeConfig) -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on cfg.host:cfg.port and deploy; the URL.
    A non-loopback host without a token is refused (ValueError) unless cfg.insecure."""
    cfg.check_exposure()
    app = build(cfg)
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        cfg.check_exposure()
    except (OSError, ValueError, ValidationError) as e:
        print(f"serving: error: {e}", file=sys.stderr)
        return 2
    url = run(cfg)
    docs = f"{url}docs" if cfg.api_docs else f"{url}openapi.json"
    print(f"serving {cfg.model_uri} at {url} (API: {docs}); Ctrl-C stops", flush=True)
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
