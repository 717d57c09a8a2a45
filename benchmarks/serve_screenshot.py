r"""A screenshot of the search page on a real index (docs/serve_screenshot.png).

    python -m benchmarks.serve_screenshot --index_dir=runs/search_test \
        --query="black leather boots" --filter=category=shoes --out=docs/serve_screenshot.png

Starts `python -m launch.serve` on a free localhost port, opens the page in headless chromium
(selenium, /usr/bin/chromium + /usr/bin/chromedriver), types --query, picks the --filter value,
waits for the grid and its thumbnails, and saves the window.
"""

import os
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags
import httpx

_INDEX_DIR = flags.DEFINE_string("index_dir", None, "Product index to serve.", required=True)
_SERVER_ARGS = flags.DEFINE_list("server_args", [], "Extra launch.serve flags (without --).")
_QUERY = flags.DEFINE_string("query", "black leather boots", "Text typed in the query box.")
_FILTER = flags.DEFINE_string("filter", "", "FIELD=VALUE chosen in the filter panel (optional).")
_K = flags.DEFINE_integer("k", 10, "Results shown.")
_SIZE = flags.DEFINE_list("window", ["1280", "1000"], "Browser window width,height.")
_OUT = flags.DEFINE_string("out", "docs/serve_screenshot.png", "Where the PNG goes.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  del argv
  from selenium import webdriver  # pylint: disable=g-import-not-at-top  # Optional dependency.
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--index_dir={_INDEX_DIR.value}", f"--port={port}"]
      + [f"--{a}" for a in _SERVER_ARGS.value], cwd=ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  options = webdriver.ChromeOptions()
  options.binary_location = "/usr/bin/chromium"
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--hide-scrollbars", f"--window-size={_SIZE.value[0]},{_SIZE.value[1]}"):
    options.add_argument(arg)
  driver = None
  try:
    while True:
      if server.poll() is not None:
        raise SystemExit(f"the server exited with {server.returncode}")
      try:
        if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    driver = webdriver.Chrome(service=service.Service("/usr/bin/chromedriver"), options=options)
    wait = ui.WebDriverWait(driver, 60)
    driver.get(url + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys(str(_K.value))
    if _FILTER.value:
      field, value = _FILTER.value.split("=", 1)
      ui.Select(driver.find_element(By.ID, f"filter-{field}")).select_by_visible_text(value)
    driver.find_element(By.ID, "query").send_keys(_QUERY.value)
    driver.find_element(By.ID, "search").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card"))
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && "
        "i.naturalWidth > 0)"))
    driver.save_screenshot(_OUT.value)
    print(f"wrote {_OUT.value}: {driver.find_element(By.ID, 'status').text}")
  finally:
    if driver is not None:
      driver.quit()
    server.terminate()
    server.wait(30)


if __name__ == "__main__":
  app.run(main)
