"""The demo page in a real browser: serve.py as a subprocess on a free localhost port, headless Chromium (Debian's
chromium + chromium-driver) driven by selenium. Skips when selenium or the browser is not installed; CI installs
them (apt-get install -y chromium chromium-driver; pip install selenium)."""

import shutil
import tempfile

import pytest

from conftest import ROOT
from test_serve import Server

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")


def _browser():
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no headless browser: apt-get install -y chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    profile = tempfile.mkdtemp(prefix="nanorad-chromium-")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1400,1500", f"--user-data-dir={profile}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts), profile


@pytest.mark.slow
def test_page_classifies_a_real_xray_and_searches_and_drafts(serve_models, real_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    xray = real_dir / "images" / "nih_00000001_000.png"
    if not xray.is_file():
        pytest.skip(f"{xray} is absent")
    args = [f"--classifier={serve_models['classifier']}", f"--clip={serve_models['clip']}",
            f"--index={serve_models['data_dir']}", "--split=test", f"--gpt={serve_models['gpt']}"]
    with Server(args, tmp_path / "serve.log") as srv:
        status, api = srv.post_file("/v1/classify", xray.name, xray.read_bytes())
        assert status == 200, api
        status, report = srv.post_file("/v1/report", xray.name, xray.read_bytes())
        assert status == 200, report
        driver, profile = _browser()
        try:
            wait = WebDriverWait(driver, 120)
            driver.get(srv.url + "/")
            notice = driver.find_element(By.ID, "notice").text.lower()
            assert "research demo" in notice and "not a medical device" in notice
            wait.until(lambda d: "loaded: classifier" in d.find_element(By.ID, "models").text)
            driver.find_element(By.ID, "file").send_keys(str(xray))  # the drop zone's file input

            # the findings list: every class, ranked, the same probabilities as the API for the same file
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#findings li")) == len(api["classes"]))
            items = driver.find_elements(By.CSS_SELECTOR, "#findings li")
            names = [li.get_attribute("data-finding") for li in items]
            probs = [float(li.find_element(By.CLASS_NAME, "prob").text) for li in items]
            assert names == [f["finding"] for f in api["findings"]]
            assert probs == [round(f["probability"], 3) for f in api["findings"]]
            positive = [li.get_attribute("data-finding") for li in items if "positive" in li.get_attribute("class")]
            assert positive == api["positive"]
            # the heatmap overlay: a decoded PNG of the top finding
            wait.until(lambda d: d.execute_script(
                "const i = document.getElementById('heatmap'); return !i.hidden && i.complete && i.naturalWidth > 0;"))
            heat = driver.find_element(By.ID, "heatmap")
            assert heat.get_attribute("src").startswith("data:image/png;base64,")
            assert heat.get_attribute("alt") == "heatmap for " + api["findings"][0]["finding"]
            assert driver.execute_script("return document.getElementById('heatmap').naturalWidth") >= 224
            assert api["heatmap_method"] in driver.find_element(By.ID, "caption").text

            # search: a text query shows index images with their reports
            driver.find_element(By.ID, "query").send_keys("Moderate left pleural effusion.")
            driver.find_element(By.CSS_SELECTOR, "#search-form button").click()
            wait.until(lambda d: d.execute_script(
                "const f = document.querySelectorAll('#results img'); return f.length === 5 && "
                "[...f].every((i) => i.complete && i.naturalWidth === 32);"))
            assert all(" | " in c.text for c in driver.find_elements(By.CSS_SELECTOR, "#results figcaption"))

            # the report draft from the image-conditioned GPT
            driver.find_element(By.ID, "draft").click()
            want = report["report"] or "(the model wrote an empty report)"  # the tiny test GPT may end at once
            wait.until(lambda d: d.find_element(By.ID, "report").text not in ("", "writing ..."))
            assert driver.find_element(By.ID, "report").text == want.strip()
            present = [t["finding"] for t in report["tags"] if t["present"]]
            assert driver.find_element(By.ID, "tags").text == "finding head: " + (", ".join(present) or "none")

            out = ROOT / "out"
            out.mkdir(exist_ok=True)
            shot = out / "serve_demo.png"
            driver.execute_script("window.scrollTo(0, 0)")
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            print(f"screenshot: {shot}")
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
        assert srv.get("/healthz")[0] == 200
