"""serving/: the Ray Serve restoration API over real HTTP on 127.0.0.1, on a real local Ray, with
two tiny model versions in a real MLflow store; plus its pure parts (negotiation, config)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from ray import serve
from ray.serve.schema import ServeDeploySchema
from skimage import data

from diffbir.config import build_parser
from diffbir.image_io import decode_image, encode_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from pipelines.ray_env import ensure_ray, free_port
from serving.app import build_app, run
from serving.config import TOKEN_ENV, ServeConfig, parse_config
from serving.limits import ApiError, negotiate
from training import registry

from conftest import DEFAULTS, TOKEN, new_run, save_tiny

ROOT = Path(__file__).resolve().parents[1]
NAME = "diffbir-serve"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_STEPS = 20  # the server's max_steps here: a batch of four 128x128 images takes seconds


# ---------------------------------------------------------------- helpers (the web test uses them too)


def photo(name: str, h: int, w: int) -> np.ndarray:
    """A real photo's top-left crop, uint8 RGB."""
    return getattr(data, name)()[:h, :w]


def png(img: np.ndarray) -> bytes:
    return encode_image(img.astype(np.float32) / 255)


def decoded(content: bytes) -> np.ndarray:
    return decode_image(content)[0]


def direct(pipeline: RestorationPipeline, image_png: bytes, seed: int, **options) -> np.ndarray:
    """What the pipeline restores from this upload alone (the reference for a served response)."""
    return pipeline([decoded(image_png)], RestoreOptions(**DEFAULTS | options), [seed])[0]


def assert_same_restoration(response: httpx.Response, expected: np.ndarray) -> None:
    """An 8-bit PNG of `expected`: rounding plus float noise across batch sizes stays under 2/255."""
    got = decoded(response.content)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2 / 255


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data worth the name."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    "accept, media",
    [
        (None, "image/png"),
        ("*/*", "image/png"),
        ("image/webp", "image/webp"),
        ("image/jpeg, image/png;q=0.5", "image/jpeg"),
        ("image/*;q=0.8, image/webp", "image/webp"),
        ("image/*, image/png;q=0", "image/jpeg"),  # the specific range wins over the wildcard
        ("text/html, */*;q=0.1", "image/png"),
    ],
)
def test_negotiate(accept, media):
    assert negotiate(accept) == media


@pytest.mark.parametrize("accept", ["text/html", "image/gif", "image/png;q=0, image/jpeg;q=0, image/webp;q=0"])
def test_negotiate_refuses(accept):
    with pytest.raises(ApiError) as e:
        negotiate(accept)
    assert e.value.status == 406 and "image/png" in e.value.message


def test_yaml_configs_and_flags(monkeypatch):
    fields = {a.dest for a in build_parser(ServeConfig)._actions} - {"help", "config"}
    assert fields == set(ServeConfig.model_fields)  # every field has a flag
    cfg = parse_config(
        [
            "--config",
            str(ROOT / "serving/configs/serve.yaml"),
            "--port",
            "9001",
            "--autoscaling",
            '{"max_replicas": 3}',
            "--defaults",
            '{"steps": 20}',
            "--num-gpus",
            "1",
        ]
    )
    assert (cfg.port, cfg.autoscaling.max_replicas, cfg.defaults) == (9001, 3, {"steps": 20})
    options = cfg.deployment_options()
    assert options["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert ServeConfig(num_replicas=3).deployment_options()["num_replicas"] == 3

    with pytest.raises(ValueError, match="steps"):
        ServeConfig(defaults={"steps": 0})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeConfig(max_batch_size=16, max_ongoing_requests=8)

    monkeypatch.setenv(TOKEN_ENV, "from-env")
    monkeypatch.chdir(ROOT)
    pinned = ServeConfig(model_uri="runs/some-model").for_replicas()
    assert pinned.auth_token == "from-env" and pinned.model_uri == str(ROOT / "runs/some-model")
    assert ServeConfig(auth_token="from-config").for_replicas().auth_token == "from-config"
    assert ServeConfig().for_replicas().model_uri == "models:/diffbir@champion"


def test_serve_deploy_config_builds_the_app(monkeypatch):
    """serving/configs/serve_deploy.yaml is a valid Serve config whose args build the application."""
    monkeypatch.chdir(ROOT)
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serving/configs/serve_deploy.yaml").read_text()))
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    assert isinstance(build_app(app.args), serve.Application)
    assert isinstance(build_app({**app.args, "max_batch_size": 2, "port": 9000}), serve.Application)


# ---------------------------------------------------------------- the running app


@pytest.fixture(scope="module")
def versions(mlflow_store, tiny_bundle) -> dict[str, RestorationPipeline]:
    """v1: the tiny reference weights, v2: stage 1 perturbed; @champion -> v1. Their pipelines."""
    for i, noise in ((1, 0.0), (2, 0.05)):
        assert registry.register_model(
            new_run(), save_tiny(mlflow_store / f"model{i}", tiny_bundle, noise), NAME
        ) == str(i)
    registry.set_alias(NAME, "champion", "1")
    return {v: RestorationPipeline.from_pretrained(registry.resolve(f"models:/{NAME}/{v}")) for v in ("1", "2")}


@pytest.fixture(scope="module")
def config(mlflow_store) -> ServeConfig:
    return ServeConfig(
        model_uri=f"models:/{NAME}@champion",
        tracking_dir=str(mlflow_store / "store"),  # MLFLOW_TRACKING_URI (mlflow_store sets it) wins
        cache_dir=str(mlflow_store / "serve-cache"),
        reload_interval_s=0,
        defaults=DEFAULTS,
        port=free_port(),
        auth_token=TOKEN,
        max_batch_size=4,
        batch_wait_timeout_s=0.5,  # long enough for concurrent test requests to share batches
        max_body_bytes=64 * 1024,
        max_input_pixels=128 * 128,
        max_work_pixels=160 * 160,
        max_steps=LONG_STEPS,
    )


@pytest.fixture(scope="module")
def client(versions, config):
    ensure_ray()
    url = run(config)
    with httpx.Client(base_url=url, timeout=300) as http:
        yield http
    serve.shutdown()


def restore(client: httpx.Client, image: bytes, headers: dict | None = None, **params) -> httpx.Response:
    return client.post("/v1/restore", params=params, content=image, headers=AUTH | (headers or {}))


def test_health_is_open_and_everything_else_needs_the_token(client):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model_version": "1"}
    image = png(photo("astronaut", 64, 64))
    calls = [
        ("GET", "/v1/model", None),
        ("GET", "/v1/stats", None),
        ("POST", "/v1/reload", None),
        ("POST", "/v1/restore", image),
    ]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            r = client.request(method, path, content=body, headers=headers)
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/model", headers=AUTH).status_code == 200


def test_restore_raw_and_multipart_match_the_pipeline(client, versions):
    image = png(photo("astronaut", 64, 64))
    raw = restore(client, image, headers={"Content-Type": "image/png"}, task="denoise", seed=7)
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "image/png"
    assert (raw.headers["X-Model-Name"], raw.headers["X-Model-Version"]) == (NAME, "1")
    assert raw.headers["X-Model-URI"] == f"models:/{NAME}/1" and raw.headers["X-Seed"] == "7"
    assert_same_restoration(raw, direct(versions["1"], image, 7, task="denoise"))

    # options as form fields win over the query; sr x2 doubles the size
    crop = png(photo("coffee", 48, 64))
    form = client.post(
        "/v1/restore",
        params={"task": "denoise", "seed": 1},
        headers=AUTH,
        files={"file": ("coffee.png", crop, "image/png")},
        data={"task": "sr", "upscale": "2", "seed": "11"},
    )
    assert form.status_code == 200, form.text
    assert form.headers["X-Seed"] == "11"
    assert_same_restoration(form, direct(versions["1"], crop, 11, task="sr", upscale=2))
    assert decoded(form.content).shape == (96, 128, 3)

    # no seed: the server draws one and says which, and that seed reproduces the response
    drawn = restore(client, image, task="denoise")
    assert_same_restoration(drawn, direct(versions["1"], image, int(drawn.headers["X-Seed"]), task="denoise"))


def test_output_follows_accept_and_the_input_form(client):
    image = png(photo("chelsea", 64, 64))
    jpeg = restore(client, image, headers={"Accept": "image/jpeg"}, task="denoise", seed=1)
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:3] == b"\xff\xd8\xff"
    webp = restore(client, image, headers={"Accept": "text/html;q=0.9, image/webp"}, task="denoise", seed=1)
    assert webp.headers["content-type"] == "image/webp" and webp.content[8:12] == b"WEBP"
    assert decoded(webp.content).shape == (64, 64, 3)
    gray = io.BytesIO()
    Image.fromarray(photo("camera", 64, 64)).save(gray, "PNG")
    out = restore(client, gray.getvalue(), task="denoise", seed=1)
    assert Image.open(io.BytesIO(out.content)).mode == "L"  # grayscale in, grayscale out


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo("astronaut", 32, 32)).save(buf, "GIF")
    return buf.getvalue()


def _big_png() -> bytes:
    """A real 512x512 PNG of a few hundred bytes: 262,144 pixels, over the test limit of 16,384."""
    buf = io.BytesIO()
    Image.new("RGB", (512, 512)).save(buf, "PNG")
    return buf.getvalue()


def _chunks(total: int):
    for _ in range(total // 8192):
        yield b"\0" * 8192


GOOD = png(photo("astronaut", 64, 64))
MULTIPART = "multipart/form-data; boundary=xyz"

REFUSALS = [
    # (what, request kwargs, status, error code, field)
    ("body over the limit (Content-Length)", dict(content=b"\0" * 70_000), 413, "payload_too_large", None),
    ("chunked body over the limit", dict(content=_chunks(80 * 1024)), 413, "payload_too_large", None),
    ("pixels over the limit, from the header", dict(content=_big_png()), 413, "payload_too_large", None),
    (
        "a 100000x100000 PNG header (bomb)",
        dict(content=png_header_only(100_000, 100_000)),
        413,
        "payload_too_large",
        None,
    ),
    ("not an image", dict(content=b"hello, world"), 415, "unsupported_media_type", None),
    ("a GIF", dict(content=_gif()), 415, "unsupported_media_type", None),
    ("a truncated PNG", dict(content=GOOD[: len(GOOD) // 2], params={"task": "denoise"}), 422, "corrupt_image", None),
    ("an empty body", dict(content=b""), 422, "missing_image", None),
    ("steps 0", dict(content=GOOD, params={"steps": 0}), 422, "invalid_option", "steps"),
    (
        "steps over the server's maximum",
        dict(content=GOOD, params={"steps": LONG_STEPS + 1}),
        422,
        "invalid_option",
        "steps",
    ),
    ("unknown task", dict(content=GOOD, params={"task": "colorize"}), 422, "invalid_option", "task"),
    ("unknown sampler", dict(content=GOOD, params={"sampler": "magic"}), 422, "invalid_option", "sampler"),
    ("not a number", dict(content=GOOD, params={"cfg_scale": "lots"}), 422, "invalid_option", "cfg_scale"),
    ("unknown option", dict(content=GOOD, params={"sharpen": 1}), 422, "invalid_option", "sharpen"),
    ("output too large (sr x4)", dict(content=GOOD, params={"task": "sr"}), 422, "invalid_option", "upscale"),
    (
        "bad form field",
        dict(files={"file": ("a.png", GOOD)}, data={"guidance_space": "hsv"}),
        422,
        "invalid_option",
        "guidance_space",
    ),
    ("multipart without a file", dict(files={"image": ("a.png", GOOD)}), 422, "missing_image", "file"),
    ("malformed multipart", dict(content=b"garbage", headers={"Content-Type": MULTIPART}), 400, "bad_multipart", None),
    ("no acceptable output", dict(content=GOOD, headers={"Accept": "image/gif"}), 406, "not_acceptable", None),
]


@pytest.mark.parametrize("what, request_args, status, code, field", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_json_4xx(client, what, request_args, status, code, field):
    args = dict(request_args)
    r = client.post("/v1/restore", headers=AUTH | args.pop("headers", {}), **args)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and body["message"]
    if field:
        assert body["field"] == field and field in body["message"]


def test_unknown_routes_are_json(client):
    assert client.get("/v2/nothing").json()["error"] == "not_found"
    r = client.get("/v1/restore", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    restore_op = schema["paths"]["/v1/restore"]["post"]
    params = {p["name"] for p in restore_op["parameters"]}
    assert set(RestoreOptions.model_fields) <= params
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(restore_op["requestBody"]["content"])
    assert {"200", "401", "406", "413", "415", "422"} <= set(restore_op["responses"])
    assert "X-Model-Version" in restore_op["responses"]["200"]["headers"]
    assert {"/healthz", "/v1/model", "/v1/reload", "/v1/stats"} <= set(schema["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "v1/restore" in page.text


def test_concurrent_requests_each_get_their_own_result(client, versions):
    """Different images, sizes, tasks and seeds at once: every response is its own request's
    restoration (as the pipeline gives it alone), and requests shared batches."""
    before = client.get("/v1/stats", headers=AUTH).json()
    requests = [
        (png(photo("astronaut", 64, 64)), dict(task="denoise", seed=1)),
        (png(photo("coffee", 64, 64)), dict(task="denoise", seed=2)),
        (png(photo("astronaut", 64, 64)), dict(task="denoise", seed=3)),  # same image, other seed
        (png(photo("chelsea", 48, 64)), dict(task="denoise", seed=4)),  # another canvas
        (png(photo("rocket", 32, 48)), dict(task="sr", upscale=2, seed=5)),  # other options
    ]
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda req: restore(client, req[0], **req[1]), requests))
    assert [r.status_code for r in responses] == [200] * len(requests)
    for (image, options), response in zip(requests, responses):
        assert response.headers["X-Seed"] == str(options["seed"])
        assert_same_restoration(response, direct(versions["1"], image, **options))
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1
    after = client.get("/v1/stats", headers=AUTH).json()
    assert after["requests"] - before["requests"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests)


def test_model_info(client):
    info = client.get("/v1/model", headers=AUTH).json()
    assert (info["name"], info["version"], info["alias"]) == (NAME, "1", "champion")
    assert info["requested_uri"] == f"models:/{NAME}@champion" and info["uri"] == f"models:/{NAME}/1"
    assert info["tags"]["lineage.run_id"] == info["run_id"]
    assert set(info["parts"]) == {"vae", "unet", "controlnet", "swinir"}
    assert info["parts"]["unet"]["config"]["num_head_channels"] == 16
    assert info["defaults"] == DEFAULTS


def wait_for_a_running_batch(client: httpx.Client) -> None:
    deadline = time.monotonic() + 120
    while not client.get("/v1/stats", headers=AUTH).json()["restoring"]:
        assert time.monotonic() < deadline, "no batch started"
        time.sleep(0.05)


def test_reload_switches_versions_without_dropping_requests(client, versions):
    image = png(photo("astronaut", 128, 128))
    slow = dict(task="denoise", steps=LONG_STEPS)  # seconds of sampling: the swap happens meanwhile
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(restore, client, image, seed=i, **slow) for i in range(4)]
        wait_for_a_running_batch(client)
        registry.set_alias(NAME, "champion", "2")
        reload = client.post("/v1/reload", headers=AUTH)
        in_flight = sum(not f.done() for f in futures)
        responses = [f.result() for f in futures]
    assert reload.status_code == 200
    assert reload.json() == {"previous": "1", "version": "2", "uri": f"models:/{NAME}/2", "changed": True}
    assert in_flight >= 1  # v2 was loaded and swapped in while a batch ran on v1
    assert [r.status_code for r in responses] == [200] * 4
    served = [r.headers["X-Model-Version"] for r in responses]
    assert "1" in served
    for version in set(served):  # each header names the version that really restored its image
        seeds = [i for i, v in enumerate(served) if v == version]
        expected = versions[version]([decoded(image)] * len(seeds), RestoreOptions(**DEFAULTS | slow), seeds)
        for i, restored in zip(seeds, expected):
            assert_same_restoration(responses[i], restored)

    image = png(photo("astronaut", 64, 64))
    later = restore(client, image, task="denoise", seed=0)
    assert (later.headers["X-Model-Version"], later.headers["X-Model-URI"]) == ("2", f"models:/{NAME}/2")
    v2, v1 = (direct(versions[v], image, 0, task="denoise") for v in ("2", "1"))
    assert_same_restoration(later, v2)
    assert np.abs(v2 - v1).max() > 0.05  # the weights changed, not only the header
    assert client.post("/v1/reload", headers=AUTH).json()["changed"] is False


def test_reload_keeps_serving_when_the_registry_cannot_resolve(client):
    MlflowClient().delete_registered_model_alias(NAME, "champion")
    try:
        r = client.post("/v1/reload", headers=AUTH)
        assert r.status_code == 409 and r.json()["error"] == "registry_error"
        assert "champion" in r.json()["message"] and "still serving v2" in r.json()["message"]
        assert client.get("/healthz").json()["model_version"] == "2"
    finally:
        registry.set_alias(NAME, "champion", "2")


def test_redeploy_keeps_requests_and_follows_the_alias(client, config):
    """Deploying again (here: alias polling on) rolls the replica over; requests in flight
    finish, and the new replica follows the alias by itself."""
    image = png(photo("coffee", 128, 128))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(restore, client, image, task="denoise", steps=LONG_STEPS, seed=i) for i in range(2)]
        wait_for_a_running_batch(client)
        run(config.model_copy(update={"reload_interval_s": 1.0}))
        responses = [f.result() for f in futures]
    assert [(r.status_code, r.headers["X-Model-Version"]) for r in responses] == [(200, "2")] * 2
    registry.set_alias(NAME, "champion", "1")
    image = png(photo("coffee", 64, 64))
    deadline = time.monotonic() + 60
    while client.get("/healthz").json()["model_version"] != "1":
        assert time.monotonic() < deadline, "the replica did not follow @champion back to v1"
        time.sleep(0.5)
    assert restore(client, image, task="denoise", seed=0).headers["X-Model-Version"] == "1"
