"""The similarity service's web page in a real headless browser (issue 14): Debian's chromium + chromium-driver
driven by Selenium. Marked e2e (not in the default run):

    apt-get install chromium chromium-driver && .venv/bin/pip install selenium
    .venv/bin/python -m pytest -m e2e tests/test_service_e2e.py

Loads the page, identifies an uploaded image (matches with scores), enrols a role from several images with the
token, sees it listed, sees its thumbnails among the matches, deletes it."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_service import AUTH, TOKEN, free_port, model_file, png  # noqa: E402,F401


def role_names(d) -> list[str]:  # via JS: the list is re-rendered, element handles go stale
    return d.execute_script("return [...document.querySelectorAll('#roles .role-name')].map(e => e.textContent)")


@pytest.fixture
def server(model_file, tmp_path):  # noqa: F811
    import uvicorn

    from animeai.online import OnlineLearningSystem
    from animeai.online.service import create_app

    ol = OnlineLearningSystem(model_file, tmp_path / "db", device="cpu")
    app = create_app(ol, token=TOKEN)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{srv.config.port}", app
    srv.should_exit = True
    thread.join(20)
    assert app.state.metrics.unhandled == 0


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--user-data-dir={tmp_path / 'chrome'}"]:
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


def test_page_identify_enrol_list_delete(server, browser, tmp_path):
    url, app = server
    images = []
    for i in range(4):
        p = tmp_path / f"pic{i}.png"
        p.write_bytes(png(40 + i))
        images.append(p)
    wait = WebDriverWait(browser, 60)
    browser.get(url + "/")
    assert "Who is this" in browser.title or "animeai" in browser.title
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#roles tr.role")) == 3)
    # identify: pick a file, see the matches with scores
    browser.find_element(By.ID, "pick").send_keys(str(images[0]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches .match")) == 3)
    first = browser.find_element(By.CSS_SELECTOR, "#matches .match .role-name").text
    assert "%" in first and browser.find_element(By.ID, "identify-error").text == ""
    # enrol without the token: the page shows the 401
    browser.find_element(By.ID, "enrol-name").send_keys("みくる")
    browser.find_element(By.ID, "enrol-files").send_keys("\n".join(str(p) for p in images[:3]))
    browser.find_element(By.CSS_SELECTOR, "#enrol button").click()
    wait.until(lambda d: "401" in d.find_element(By.ID, "enrol-error").text)
    # with the token
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#enrol button").click()
    wait.until(lambda d: "enrolled" in d.find_element(By.ID, "enrol-status").text)
    wait.until(lambda d: "みくる" in role_names(d))
    # identify again (another file: the same one fires no change event): the new role is among the matches (the
    # page asks for k=5 of 4 roles), with its exemplar thumbnails loaded
    browser.find_element(By.ID, "pick").send_keys(str(images[3]))
    wait.until(lambda d: any("みくる" in e.text for e in d.find_elements(By.CSS_SELECTOR, "#matches .match")))
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#matches .match img')].some(i => i.complete && i.naturalWidth > 0)"))
    # delete it (confirm dialog accepted)
    row = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#roles tr.role") if "みくる" in r.text)
    row.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: d.switch_to.alert).accept()
    wait.until(lambda d: "みくる" not in role_names(d))
    assert [r["name"] for r in app.state.system.list_roles()] == ["akari", "kyoko", "yui"]
