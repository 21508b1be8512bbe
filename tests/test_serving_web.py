"""The web page at / in a real headless Chromium driven by selenium: upload a real photo, pick
task and guidance, restore, compare and download, in Debian's `chromium` (.ci/run installs it).
Every state of the page (initial, preview, running, result, error) is kept as a screenshot in
$DIFFBIR_TEST_ARTIFACTS, else in a temporary folder the run prints."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path
from typing import get_args

import cv2
import httpx
import pytest
from PIL import Image
from ray import serve
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from skimage import data

from diffbir.pipeline import RestoreOptions
from diffbir.presets import PRESETS
from pipelines.ray_env import ensure_ray, free_port
from serving.app import STATIC, run
from serving.config import ServeConfig
from serving.examples import PHOTOS

from conftest import DEFAULTS, TOKEN, save_tiny

SIDE = 96  # the photo's side; sr x2 makes it 192
RUNNING_STEPS = 100  # enough sampling steps (the server's max_steps) to watch the progress of


def browser_paths() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver. Installing them is set-up's job (.ci/run does
    it): without them the test is skipped, or fails where DIFFBIR_REQUIRE_BROWSER is set (CI)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        reason = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("DIFFBIR_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium, chromedriver


@pytest.fixture(scope="module")
def page_url(tmp_path_factory, tiny_bundle):
    """The app on the tiny model as a local platform directory (no registry needed here)."""
    root = tmp_path_factory.mktemp("web")
    model_dir = save_tiny(root / "model", tiny_bundle)
    (root / "token").write_text(TOKEN)
    cfg = ServeConfig(
        model_uri=str(model_dir),
        reload_interval_s=0,
        defaults=DEFAULTS,
        port=free_port(),
        auth_token_file=str(root / "token"),
    )
    ensure_ray()
    url = run(cfg)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(request, tmp_path_factory) -> Path:
    """Where the screenshots go: $DIFFBIR_TEST_ARTIFACTS, else a temporary folder; printed."""
    folder = os.environ.get("DIFFBIR_TEST_ARTIFACTS")
    path = Path(folder) / "web" if folder else tmp_path_factory.mktemp("web_screenshots")
    path.mkdir(parents=True, exist_ok=True)
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nscreenshots of the web page: {path}")
    return path


def screenshot(driver, artifacts: Path, state: str) -> None:
    """The page as it looks now, a small JPEG (a PNG of the window is several times larger)."""
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        shot.convert("RGB").save(artifacts / f"{state}.jpg", quality=70)


def open_page(driver, url: str) -> None:
    """Load the page and wait until it shows the model the server named (GET info answered)."""
    driver.get(url)
    model = "model model, version local"  # the tiny model's directory is called model
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == model)


def image_state(driver, element_id: str) -> list:
    script = "return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]"
    return driver.execute_script(script, driver.find_element(By.ID, element_id))


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def finished(driver) -> bool:
    status = driver.find_element(By.ID, "status").text
    return status == "done" or status.startswith("failed")


def write_photo(path: Path, side: int = SIDE) -> Path:
    small = cv2.resize(data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(path), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    return path


def test_restore_a_photo_in_the_browser(page_url, browser, tmp_path, artifacts):
    photo = write_photo(tmp_path / "astronaut.png")
    open_page(browser, page_url)
    # the choices come from the server: every task RestoreOptions knows, the presets and the model's own
    tasks = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "task")).options]
    assert tasks == list(get_args(RestoreOptions.model_fields["task"].annotation))
    presets = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "preset")).options]
    assert presets == ["", *PRESETS]
    assert "steps ≤ 100" in browser.find_element(By.ID, "limits").text
    screenshot(browser, artifacts, "initial")

    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 10).until(lambda d: image_state(d, "preview") == [True, SIDE, SIDE])
    assert browser.find_element(By.ID, "file-info").text.startswith(f"astronaut.png: {SIDE}×{SIDE}")
    screenshot(browser, artifacts, "preview")

    Select(browser.find_element(By.ID, "task")).select_by_value("sr")
    Select(browser.find_element(By.ID, "guidance_space")).select_by_value("latent")
    for field, value in (("upscale", "2"), ("guidance_scale", "0.05"), ("steps", "2"), ("seed", "5"), ("token", TOKEN)):
        fill(browser, field, value)
    browser.find_element(By.ID, "restore").click()
    WebDriverWait(browser, 300, poll_frequency=0.5).until(finished)
    assert browser.find_element(By.ID, "status").text == "done"
    screenshot(browser, artifacts, "result")

    assert image_state(browser, "after") == [True, 2 * SIDE, 2 * SIDE]
    assert image_state(browser, "before") == [True, SIDE, SIDE]
    meta = browser.find_element(By.ID, "meta").text
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0  # the token: not kept
    assert f"{2 * SIDE}×{2 * SIDE}" in meta and "model vlocal" in meta and "seed 5" in meta

    # the download link holds the PNG itself
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("download") == "restored.png" and link.get_attribute("href").startswith("blob:")
    encoded = browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.blob()).then(b => { const f = new FileReader();
          f.onload = () => done(f.result.split(",")[1]); f.readAsDataURL(b); });""",
        link.get_attribute("href"),
    )
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as result:
        assert (result.format, result.size) == ("PNG", (2 * SIDE, 2 * SIDE))
        result.load()  # every pixel decodes

    # the slider uncovers the input from the left
    browser.execute_script(
        "const s = document.getElementById('slider'); s.value = 30; s.dispatchEvent(new Event('input'));"
    )
    assert browser.find_element(By.ID, "before").value_of_css_property("clip-path") == "inset(0px 70% 0px 0px)"
    # and so does a click on the images, at the point clicked (a quarter from the left)
    compare = browser.find_element(By.ID, "compare")
    ActionChains(browser).move_to_element_with_offset(compare, -compare.rect["width"] // 4, 0).click().perform()
    assert abs(int(browser.find_element(By.ID, "slider").get_attribute("value")) - 25) <= 1


def test_an_example_restores_with_progress_shown(page_url, browser, artifacts):
    open_page(browser, page_url)
    browser.find_element(By.CSS_SELECTOR, '.example[data-src$="astronaut.jpg"]').click()
    WebDriverWait(browser, 10).until(lambda d: image_state(d, "preview") == [True, 256, 256])
    assert browser.find_element(By.ID, "file-info").text.startswith("astronaut.jpg: 256×256")

    Select(browser.find_element(By.ID, "task")).select_by_value("denoise")
    for field, value in (("steps", str(RUNNING_STEPS)), ("seed", "1"), ("token", TOKEN)):
        fill(browser, field, value)
    browser.find_element(By.ID, "restore").click()
    elapsed = browser.find_element(By.ID, "elapsed")
    WebDriverWait(browser, 10).until(lambda d: elapsed.text.endswith("s elapsed"))
    first = elapsed.text
    WebDriverWait(browser, 10).until(lambda d: elapsed.text != first)  # the clock runs
    # the server reports the sampling steps of this request (GET v1/progress/<its X-Request-Id>)
    steps = browser.find_element(By.ID, "steps-done")
    WebDriverWait(browser, 120, poll_frequency=0.1).until(lambda d: steps.text.startswith("step "))
    assert browser.find_element(By.ID, "status").text == "restoring…"
    done, total = map(int, re.fullmatch(r"step (\d+) of (\d+)", steps.text).groups())
    assert total == RUNNING_STEPS and 0 <= done <= total
    assert browser.find_element(By.ID, "bar").get_attribute("max") == str(total)
    assert browser.find_element(By.ID, "progress-box").is_displayed()
    screenshot(browser, artifacts, "running")

    WebDriverWait(browser, 300, poll_frequency=0.5).until(finished)
    assert browser.find_element(By.ID, "status").text == "done"
    assert image_state(browser, "after") == [True, 256, 256]
    assert not browser.find_element(By.ID, "restore").get_attribute("disabled")
    assert not browser.find_element(By.ID, "progress-box").is_displayed()


def test_the_page_shows_refusals(page_url, browser, tmp_path, artifacts):
    assert httpx.get(page_url).headers["content-type"].startswith("text/html")
    open_page(browser, page_url)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    fill(browser, "token", TOKEN)
    browser.find_element(By.ID, "restore").click()
    WebDriverWait(browser, 60).until(finished)
    status = browser.find_element(By.ID, "status")
    assert "failed: 415" in status.text and status.get_attribute("class") == "error"
    assert "send PNG, JPEG" in status.text and "Choose another file" in status.text
    assert not browser.find_element(By.ID, "viewer").is_displayed()
    screenshot(browser, artifacts, "error")

    def refused(code: int) -> str:
        browser.find_element(By.ID, "restore").click()
        WebDriverWait(browser, 60).until(lambda d: status.text.startswith(f"failed: {code}"))
        return status.text

    # an option over the server's limit: the message names it and the field is marked
    browser.find_element(By.ID, "file").send_keys(str(write_photo(tmp_path / "photo.png")))
    fill(browser, "steps", "1000")
    assert "steps: at most 100 on this server" in refused(422)
    assert "invalid" in browser.find_element(By.ID, "steps").get_attribute("class")
    # no token: the page asks for it
    fill(browser, "steps", "2")
    browser.find_element(By.ID, "token").clear()
    assert "enter it in the Token field" in refused(401)
    assert "invalid" in browser.find_element(By.ID, "token").get_attribute("class")
    assert "invalid" not in browser.find_element(By.ID, "steps").get_attribute("class")
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0


def test_the_page_keeps_no_token_and_headers_name_no_paths(page_url):
    page = httpx.get(page_url)
    assert "localStorage" not in page.text and "sessionStorage" not in page.text
    photo = cv2.imencode(".png", cv2.resize(data.astronaut(), (64, 64)))[1].tobytes()
    r = httpx.post(
        page_url + "v1/restore",
        params={"task": "denoise", "seed": 1},
        content=photo,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-URI"] == "local:model"  # the directory's name, not where it lies
    info = httpx.get(page_url + "v1/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert info["uri"] == info["requested_uri"] == "local:model" and "/model" not in str(info)  # no path


def test_info_and_progress_endpoints(page_url):
    info = httpx.get(page_url + "info").json()  # no token: what the page shows before one is entered
    assert info["model"] == {"name": "model", "version": "local", "release": None}
    assert info["tasks"] == list(get_args(RestoreOptions.model_fields["task"].annotation))
    assert info["presets"] == list(PRESETS) and info["token_required"] is True
    assert info["limits"]["max_steps"] == 100 and "/" not in str(info)  # no paths

    auth = {"Authorization": f"Bearer {TOKEN}"}
    photo = cv2.imencode(".png", cv2.resize(data.astronaut(), (64, 64)))[1].tobytes()
    request_id = "test-progress-0001"
    r = httpx.post(
        page_url + "v1/restore",
        params={"task": "denoise", "steps": 3, "seed": 1},
        content=photo,
        headers={**auth, "X-Request-Id": request_id},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    progress = httpx.get(page_url + f"v1/progress/{request_id}", headers=auth)
    assert progress.json() == {"stage": "done", "steps_done": 3, "steps_total": 3}
    assert httpx.get(page_url + f"v1/progress/{request_id}").status_code == 401
    unknown = httpx.get(page_url + "v1/progress/never-sent-0001", headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_request"
    bad = httpx.post(page_url + "v1/restore", content=photo, headers={**auth, "X-Request-Id": "a/b"}, timeout=60)
    assert bad.status_code == 422 and bad.json()["field"] == "X-Request-Id"


def test_example_images_are_small_jpegs_the_page_offers(page_url):
    page = (STATIC / "index.html").read_text()
    offered = re.findall(r'data-src="(static/examples/[^"]+)"', page)
    assert offered == [f"static/examples/{name}.jpg" for name in PHOTOS]  # `python -m serving.examples` writes them
    for src in offered:
        path = STATIC.parent / src
        assert 1_000 < path.stat().st_size < 64_000, src
        with Image.open(path) as im:
            assert im.format == "JPEG" and max(im.size) == 256
            im.load()
        served = httpx.get(page_url + src)
        assert served.status_code == 200 and served.content == path.read_bytes()
        assert served.headers["content-type"] == "image/jpeg"
