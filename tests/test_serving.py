"""serving/: the Ray Serve restoration API over real HTTP on 127.0.0.1, on a real local Ray, with
two tiny model versions in a real MLflow store; plus its pure parts (negotiation, config)."""

from __future__ import annotations

import io
import math
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
from serving.app import build_app, main, run
from serving.config import TOKEN_ENV, ServeConfig, parse_config
from serving.limits import ApiError, check_work, negotiate, restore_options
from serving.model import DeadlineError, Watchdog, restore_isolated
from training import registry

from conftest import DEFAULTS, TOKEN, new_run, save_tiny

ROOT = Path(__file__).resolve().parents[1]
NAME = "diffbir-serve"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG_STEPS = 20  # the server's max_steps here: a batch of four 128x128 images takes seconds
# the server's defaults: tiles of 128 (every test image fits one, so it restores as direct() does)
SERVER_DEFAULTS = DEFAULTS | {"tile_size": 128, "tile_stride": 64}


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
    fields = {a.dest.split(".")[0] for a in build_parser(ServeConfig)._actions} - {"help", "config"}  # sections
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

    monkeypatch.chdir(ROOT)
    pinned = ServeConfig(model_uri="runs/some-model").for_replicas()
    assert pinned.model_uri == str(ROOT / "runs/some-model")
    assert ServeConfig().for_replicas().model_uri == "models:/diffbir@champion"


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """Never from a flag or a deployment argument: replicas read it on their own node."""
    assert not any(name.endswith("token") for name in ServeConfig.model_fields)  # auth_token_file is the way
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert ServeConfig().auth_token() is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert ServeConfig().auth_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    cfg = ServeConfig(auth_token_file=str(tmp_path / "token"))
    assert cfg.auth_token() == "from-file"
    assert "from-" not in str(cfg.for_replicas().model_dump())  # what the replicas are deployed with
    (tmp_path / "token").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        cfg.auth_token()


def test_a_public_host_without_a_token_refuses_to_start(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    model = str(tmp_path / "no-model")  # nothing is loaded: the refusal comes first
    public = ServeConfig(model_uri=model, host="0.0.0.0", port=free_port(), app_name="exposed", route_prefix="/x")
    with pytest.raises(ValueError, match="--insecure"):
        run(public)
    assert main(["--model-uri", model, "--host", "0.0.0.0"]) == 2 and "--insecure" in capsys.readouterr().err
    public.model_copy(update={"insecure": True}).check_exposure()
    ServeConfig(host="::1").check_exposure()
    monkeypatch.setenv(TOKEN_ENV, "t")
    public.check_exposure()


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
    token_file = mlflow_store / "serve-token"
    token_file.write_text(TOKEN)
    return ServeConfig(
        model_uri=f"models:/{NAME}@champion",
        tracking_dir=str(mlflow_store / "store"),  # MLFLOW_TRACKING_URI (mlflow_store sets it) wins
        cache_dir=str(mlflow_store / "serve-cache"),
        reload_interval_s=0,
        defaults=SERVER_DEFAULTS,
        port=free_port(),
        auth_token_file=str(token_file),
        max_batch_size=4,
        batch_wait_timeout_s=0.5,  # long enough for concurrent test requests to share batches
        max_body_bytes=64 * 1024,
        max_input_pixels=128 * 128,
        max_output_pixels=128 * 128,
        max_work_pixels=160 * 160,
        max_held_pixels=8 * 128 * 128,  # four of the largest requests (test_reload's batch)
        max_upscale=4,
        max_steps=LONG_STEPS,
        max_guidance_repeat=3,
        max_tile_size=128,
        max_tiles=16,
        max_prompt_chars=100,
        text_context_cache_size=2,
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
GOOD_128 = png(photo("astronaut", 128, 128))
WIDE = png(photo("astronaut", 96, 160))
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
    ("upscale over the maximum", dict(content=GOOD, params={"upscale": 8}), 422, "invalid_option", "upscale"),
    (
        "work size too large",
        dict(content=GOOD, params={"task": "denoise", "min_side": 256}),
        422,
        "invalid_option",
        "min_side",
    ),
    ("seed 2^70", dict(content=GOOD, params={"seed": 2**70}), 422, "invalid_option", "seed"),
    ("negative seed", dict(content=GOOD, params={"seed": -1}), 422, "invalid_option", "seed"),
    (
        "guidance_repeat 100000",
        dict(content=GOOD, params={"guidance_scale": 0.1, "guidance_repeat": 100_000}),
        422,
        "invalid_option",
        "guidance_repeat",
    ),
    ("tile_size over the maximum", dict(content=GOOD, params={"tile_size": 256}), 422, "invalid_option", "tile_size"),
    (
        "a tiny tile_stride (thousands of tiles)",
        dict(content=GOOD_128, params={"task": "denoise", "tiled": "true", "tile_size": 64, "tile_stride": 8}),
        422,
        "invalid_option",
        "tile_stride",
    ),
    (
        "untiled over max_tile_size",
        dict(content=WIDE, params={"task": "denoise", "tiled": "false"}),  # a 192x128 canvas
        422,
        "invalid_option",
        "tiled",
    ),
    ("a long prompt", dict(content=GOOD, params={"prompt": "x" * 101}), 422, "invalid_option", "prompt"),
    (
        "a long negative prompt",
        dict(files={"file": ("a.png", GOOD)}, data={"negative_prompt": "x" * 101}),
        422,
        "invalid_option",
        "negative_prompt",
    ),
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
    assert client.get("/docs").status_code == 404  # no third-party scripts unless api_docs is on
    assert client.get("/redoc").status_code == 404
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


def test_a_poisoned_request_never_fails_its_batch_mates(client, versions):
    """A seed past torch's generator (2^70) used to fail the whole batch it joined with a 500."""
    image = png(photo("astronaut", 64, 64))
    seeds = [1, 2, 2**70, 3]
    with ThreadPoolExecutor(len(seeds)) as pool:
        responses = list(pool.map(lambda seed: restore(client, image, task="denoise", seed=seed), seeds))
    assert [r.status_code for r in responses] == [200, 200, 422, 200]
    assert responses[2].json()["field"] == "seed"
    for seed, response in zip(seeds, responses):
        if response.status_code == 200:
            assert_same_restoration(response, direct(versions["1"], image, seed, task="denoise"))
    assert max(int(r.headers["X-Batch-Size"]) for r in responses if r.status_code == 200) > 1


def test_a_failing_group_is_restored_again_apart(versions):
    """A request that fails in the pipeline (here a seed no validation let through) fails alone."""
    pipeline, image = versions["1"], decoded(png(photo("astronaut", 64, 64)))
    good = RestoreOptions(**DEFAULTS, task="denoise", seed=1)
    poisoned = good.model_copy(update={"seed": 2**70})  # model_copy does not validate
    results = restore_isolated(pipeline, [image] * 3, [good, poisoned, good.model_copy(update={"seed": 2})])
    assert isinstance(results[1], Exception) and not isinstance(results[0], Exception)
    np.testing.assert_allclose(results[2], pipeline([image], good, [2])[0], atol=1e-5)


def test_a_restoration_stops_at_its_deadline(versions):
    pipeline, image = versions["1"], decoded(png(photo("astronaut", 64, 64)))
    watchdog = Watchdog(grace_s=60)
    watchdog.watch(pipeline)
    try:
        watchdog.deadline = time.monotonic() - 1
        with pytest.raises(DeadlineError):
            pipeline([image], RestoreOptions(**DEFAULTS, task="denoise"))
        assert not watchdog.hung()  # past its deadline, but within the grace: stopping, not stuck
        watchdog.deadline = time.monotonic() - 61
        assert watchdog.hung()  # what check_health reports, and Serve replaces the replica for
    finally:
        watchdog.deadline = math.inf
    pipeline([image], RestoreOptions(**DEFAULTS, task="denoise"))  # no deadline: it runs


def test_cross_site_posts_are_refused(client):
    """A form on another site can post to a server on localhost; the browser says where from."""
    image = png(photo("astronaut", 64, 64))
    for origin in ("https://evil.example", "null"):
        r = restore(client, image, headers={"Origin": origin}, task="denoise", seed=1)
        assert r.status_code == 403 and r.json()["error"] == "cross_origin", origin
    assert client.post("/v1/reload", headers=AUTH | {"Origin": "https://evil.example"}).status_code == 403
    own = client.base_url.scheme + "://" + client.base_url.netloc.decode()
    assert restore(client, image, headers={"Origin": own}, task="denoise", seed=1).status_code == 200


def test_the_text_context_cache_is_bounded(client):
    image = png(photo("astronaut", 64, 64))
    for prompt in ("a photo", "a cat", "a dog", "a boat"):
        assert restore(client, image, task="denoise", seed=1, prompt=prompt).status_code == 200
    assert client.get("/v1/stats", headers=AUTH).json()["text_contexts"] == 2  # text_context_cache_size


def test_model_info(client):
    info = client.get("/v1/model", headers=AUTH).json()
    assert (info["name"], info["version"], info["alias"]) == (NAME, "1", "champion")
    assert info["requested_uri"] == f"models:/{NAME}@champion" and info["uri"] == f"models:/{NAME}/1"
    assert info["tags"]["lineage.run_id"] == info["run_id"]
    assert set(info["parts"]) == {"vae", "unet", "controlnet", "swinir"}
    assert info["parts"]["unet"]["config"]["num_head_channels"] == 16
    assert info["defaults"] == SERVER_DEFAULTS
    assert "source" not in info and all("source" not in part for part in info["parts"].values())  # no server paths


def wait_for_a_running_batch(client: httpx.Client) -> None:
    deadline = time.monotonic() + 120
    while True:
        stats = client.get("/v1/stats", headers=AUTH)  # a full queue turns the poll away too (503)
        if stats.status_code == 200 and stats.json()["restoring"]:
            return
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


def test_internal_errors_say_only_an_error_id(client, mlflow_store, tiny_bundle):
    """A version whose weights do not load: the reload fails with a 500 that names no path and
    no exception, only an id the server's log has the detail under."""
    broken = save_tiny(mlflow_store / "broken", tiny_bundle)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    version = registry.register_model(new_run(), broken, NAME)
    registry.set_alias(NAME, "champion", version)
    try:
        r = client.post("/v1/reload", headers=AUTH)
        assert r.status_code == 500, r.text
        body = r.json()
        assert body["error"] == "internal_error" and body["error_id"] in body["message"]
        assert "/" not in body["message"] and "safetensors" not in r.text.lower()
    finally:
        registry.set_alias(NAME, "champion", "1")


# ---------------------------------------------------------------- a strict deployment: deadline and queue

STRICT = dict(
    request_timeout_s=3,
    max_ongoing_requests=2,  # the slow request and a /v1/stats or a waiting request
    max_batch_size=1,
    max_queued_requests=1,
    retry_after_s=7,
    reload_interval_s=0,
)
SLOW = dict(task="denoise", steps=LONG_STEPS, guidance_scale=0.1, guidance_repeat=3)  # tens of seconds


@pytest.fixture(scope="module")
def strict_client(client, config):
    """The same app deployed again with a short deadline, two requests in a replica and one queued."""
    registry.set_alias(NAME, "champion", "1")
    run(config.model_copy(update=STRICT))
    return client


def test_a_request_past_its_deadline_gets_504_and_frees_the_replica(strict_client):
    client = strict_client
    start = time.monotonic()
    r = restore(client, png(photo("astronaut", 128, 128)), seed=1, **SLOW)
    assert r.status_code == 504 and r.json()["error"] == "timeout", r.text
    assert time.monotonic() - start < STRICT["request_timeout_s"] + 10
    deadline = time.monotonic() + 10
    while (stats := client.get("/v1/stats", headers=AUTH)).status_code != 200 or stats.json()["restoring"]:
        assert time.monotonic() < deadline, "the replica still restores the abandoned request"  # it stopped too
        time.sleep(0.1)
    quick = restore(client, png(photo("astronaut", 64, 64)), task="denoise", seed=1)
    assert quick.status_code == 200


def test_the_queue_is_bounded_with_retry_after(strict_client):
    """One request restoring, one waiting in the replica, one queued: the others are refused at
    once with 503 and Retry-After (the waiting ones may run out of time behind the slow one)."""
    client = strict_client
    with ThreadPoolExecutor(5) as pool:
        slow = pool.submit(restore, client, png(photo("astronaut", 128, 128)), seed=1, **SLOW)
        wait_for_a_running_batch(client)
        rest = [pool.submit(restore, client, GOOD, task="denoise", seed=i) for i in range(4)]
        responses = [f.result() for f in rest]
    assert slow.result().status_code == 504
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 503]
    assert len(refused) >= 2 and all(r.headers["Retry-After"] == "7" for r in refused), statuses
    assert set(statuses) <= {200, 503, 504}, statuses


def test_limits_apply_to_the_options_a_preset_completes():
    """A request that names no steps gets its preset's (paper: 50): the server's max_steps holds for them."""
    opts = restore_options({"preset": "paper", "task": "denoise"}, {})
    assert opts.steps == 50
    with pytest.raises(ApiError) as refused:
        check_work(64, 64, opts, ServeConfig(max_steps=20))
    assert refused.value.status == 422 and refused.value.errors[0]["field"] == "steps"
    check_work(64, 64, opts.model_copy(update={"steps": 20}), ServeConfig(max_steps=20))
