"""The app in a real browser (headless Chromium driven by selenium): train from the page and wait
for the progress to finish, and see a bad upload answered by a message, not a traceback.
Needs Debian's chromium and chromium-driver packages (.ci/run installs them)."""

import shutil

import pytest
import torch
from PIL import Image

from peftkit.apps.app import build_app, launch

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs the chromium and chromedriver binaries "
    "(Debian: apt-get install chromium chromium-driver)",
)
TINY_VIT = {
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


@pytest.fixture(scope="module")
def url(tiny_sd_path, tmp_path_factory):
    torch.set_num_threads(2)
    blocks = build_app(str(tiny_sd_path), TINY_VIT, "cpu", tmp_path_factory.mktemp("browser-runs"))
    _, local, _ = launch(blocks, port=None, block=False)
    yield local
    blocks.close()
    blocks.peftkit_runner.shutdown()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(ec.element_to_be_clickable((By.ID, "train-button")))


def _set_steps(browser, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.CSS_SELECTOR, "#steps input[type='number']")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_train_from_the_page_until_the_progress_finishes(browser, url, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, url)
    _set_steps(browser, 8)
    browser.find_element(By.ID, "train-button").click()
    # the status is re-rendered on every update: look it up afresh each time
    WebDriverWait(browser, 120, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: any(w in d.find_element(By.ID, "train-status").text for w in ("done", "failed"))
    )
    status = browser.find_element(By.ID, "train-status").text
    assert "done" in status and "step 8/8" in status, status
    WebDriverWait(browser, 30).until(
        lambda d: "unet_adapter" in d.find_element(By.ID, "adapter-files").text
    )
    shot = tmp_path / "app-after-training.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    print(f"\nscreenshot: {shot}")


def test_a_bad_upload_shows_a_message_in_the_page_not_a_traceback(browser, url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, url)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"ok{i}.png")
        Image.new("RGB", (32, 32), (120, 40 * i, 60)).save(paths[-1])
    paths.append(tmp_path / "broken.png")
    paths[-1].write_text("not a picture at all")
    browser.find_element(By.CSS_SELECTOR, "#concept-files input[type='file']").send_keys(
        "\n".join(str(p) for p in paths)
    )
    WebDriverWait(browser, 30).until(
        lambda d: "broken" in d.find_element(By.ID, "concept-files").text
    )
    browser.find_element(By.ID, "train-button").click()
    WebDriverWait(browser, 30).until(
        lambda d: "is not an image" in d.find_element(By.ID, "train-status").text
    )
    browser.save_screenshot(str(tmp_path / "app-bad-upload.png"))
    status = browser.find_element(By.ID, "train-status").text
    assert "not started" in status and "broken.png is not an image that can be read" in status
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in page and 'File "' not in page
