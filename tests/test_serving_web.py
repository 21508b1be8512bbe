"""The web page at / in a real headless Chromium driven by selenium: upload a real photo, pick
task and guidance, restore, compare and download, in Debian's `chromium` (.ci/run installs it)."""

from __future__ import annotations

import base64
import io
import os
import shutil

import cv2
import httpx
import pytest
from PIL import Image
from ray import serve
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from skimage import data

from pipelines.ray_env import ensure_ray, free_port
from serving.app import run
from serving.config import ServeConfig

from conftest import DEFAULTS, TOKEN, save_tiny

SIDE = 96  # the photo's side; sr x2 makes it 192


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


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def finished(driver) -> bool:
    status = driver.find_element(By.ID, "status").text
    return status == "done" or status.startswith("failed")


def test_restore_a_photo_in_the_browser(page_url, browser, tmp_path):
    photo = tmp_path / "astronaut.png"
    small = cv2.resize(data.astronaut(), (SIDE, SIDE), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(photo), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    browser.get(page_url)
    browser.find_element(By.ID, "file").send_keys(str(photo))
    Select(browser.find_element(By.ID, "task")).select_by_value("sr")
    Select(browser.find_element(By.ID, "guidance_space")).select_by_value("latent")
    for field, value in (("upscale", "2"), ("guidance_scale", "0.05"), ("steps", "2"), ("seed", "5"), ("token", TOKEN)):
        fill(browser, field, value)
    browser.find_element(By.ID, "restore").click()
    WebDriverWait(browser, 300, poll_frequency=0.5).until(finished)
    assert browser.find_element(By.ID, "status").text == "done"

    size = "return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]"
    assert browser.execute_script(size, browser.find_element(By.ID, "after")) == [True, 2 * SIDE, 2 * SIDE]
    assert browser.execute_script(size, browser.find_element(By.ID, "before")) == [True, SIDE, SIDE]
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


def test_the_page_shows_refusals(page_url, browser, tmp_path):
    assert httpx.get(page_url).headers["content-type"].startswith("text/html")
    browser.get(page_url)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    fill(browser, "token", TOKEN)
    browser.find_element(By.ID, "restore").click()
    WebDriverWait(browser, 60).until(finished)
    status = browser.find_element(By.ID, "status")
    assert "failed: 415" in status.text and status.get_attribute("class") == "error"
    assert not browser.find_element(By.ID, "viewer").is_displayed()


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
