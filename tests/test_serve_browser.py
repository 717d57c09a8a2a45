"""The search page in a real browser: `python -m launch.serve` in a subprocess, driven by Debian's
headless chromium through selenium.

Typing a query shows the products the index ranks first; choosing a brand filter leaves only that
brand's products, in the filtered ranking; uploading a product's image (file input) and dropping
one (a drop event carrying the file) show that product first; a text + image query on a model
without TGIR shows the server's error. A screenshot goes to tmp_path (and to
$FASHION_JAX_SCREENSHOT_DIR when set).
"""

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from fashion_jax.search import encoders
from fashion_jax.search import products
from tests.test_serve import tiny  # pylint: disable=unused-import  # The index fixture.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
_FIXTURES = (tiny,)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason=f"needs chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): "
                              "apt-get install chromium chromium-driver"),
]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny):
  index_dir, model_dir = tiny
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--index_dir={index_dir}", f"--model={model_dir}",
       f"--port={port}", "--nowarmup"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    t0 = time.time()
    while True:
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      try:
        if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      assert time.time() - t0 < 300, "server not ready in 300 s"
      time.sleep(0.3)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(20)
    except subprocess.TimeoutExpired:
      proc.kill()


@pytest.fixture(scope="module")
def driver():
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,900"):
    options.add_argument(arg)
  d = webdriver.Chrome(service=service.Service(CHROMEDRIVER), options=options)
  d.set_page_load_timeout(60)
  yield d
  d.quit()


def png_bytes(array) -> bytes:
  out = io.BytesIO()
  Image.fromarray(array).save(out, format="PNG")
  return out.getvalue()


def test_page_queries_filters_and_uploads(tiny, server, driver, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top
  index_dir, model_dir = tiny
  pindex = products.ProductIndex.load(index_dir)
  enc = encoders.load_encoder(model_dir)
  wait = ui.WebDriverWait(driver, 60)

  def version():
    return driver.find_element(By.ID, "results").get_attribute("data-version") or "0"

  def after(action):
    """Runs `action`, waits for the grid to be redrawn; -> [(id, {field: value})] shown."""
    before = version()
    action()
    wait.until(lambda d: version() != before)
    cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
    return [(c.get_attribute("data-id"),
             {t.get_attribute("data-field"): t.get_attribute("data-value")
              for t in c.find_elements(By.CSS_SELECTOR, ".tag")}) for c in cards]

  driver.get(server + "/")
  wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
  query = driver.find_element(By.ID, "query")
  k = driver.find_element(By.ID, "k")
  k.clear()
  k.send_keys("6")
  text = "red dress by Acme"
  query.send_keys(text)
  shown = after(lambda: driver.find_element(By.ID, "search").click())
  want = [h.product["product_id"] for h in pindex.search_text(enc, [text], 6)[0]]
  assert [i for i, _ in shown] == want

  # A brand filter: only that brand, in the ranking restricted to it.
  brand = driver.find_element(By.ID, "filter-brand")
  shown = after(lambda: ui.Select(brand).select_by_visible_text("Corvid"))
  corvid = [h.product["product_id"] for h in pindex.search_text(enc, [text], 24)[0]
            if h.product["brand"] == "Corvid"][:6]
  assert [i for i, _ in shown] == corvid
  assert {tags["brand"] for _, tags in shown} == {"Corvid"}
  assert "among 8 products with brand=Corvid" in driver.find_element(By.ID, "status").text

  # An uploaded image (row 5, a Corvid product): that product first.
  query.clear()
  path = tmp_path / "query.png"
  path.write_bytes(png_bytes(pindex.thumbs[5]))
  shown = after(lambda: driver.find_element(By.ID, "file").send_keys(str(path)))
  assert shown[0][0] == "p005" and {tags["brand"] for _, tags in shown} == {"Corvid"}

  # Text + image on a CLIP model (no TGIR): the server's 400, shown on the page.
  query.send_keys("in blue")
  driver.find_element(By.ID, "search").click()
  wait.until(lambda d: "no text-modified image query" in d.find_element(By.ID, "error").text)
  query.clear()
  driver.find_element(By.ID, "clear-image").click()

  # Dropped on the drop zone (a drop event with the file): row 9, with the filter cleared.
  ui.Select(brand).select_by_value("")
  data = base64.b64encode(png_bytes(pindex.thumbs[9])).decode()
  shown = after(lambda: driver.execute_script("""
      const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
      document.getElementById("drop").dispatchEvent(
          new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
      """, data))
  assert shown[0][0] == "p009" and len(shown) == 6
  # The thumbnails loaded (natural size = the stored 32 px).
  wait.until(lambda d: d.execute_script(
      "return [...document.querySelectorAll('#results img')].every(i => i.complete && "
      "i.naturalWidth === 32)"))

  shot = tmp_path / "serve_screenshot.png"
  assert driver.save_screenshot(str(shot))
  with Image.open(shot) as im:
    assert im.size[0] >= 1000 and np.asarray(im).std() > 5
  if os.environ.get("FASHION_JAX_SCREENSHOT_DIR"):
    os.makedirs(os.environ["FASHION_JAX_SCREENSHOT_DIR"], exist_ok=True)
    shutil.copy(shot, os.environ["FASHION_JAX_SCREENSHOT_DIR"])
