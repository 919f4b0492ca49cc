"""xpcnn serve's page in a real browser: draw with pointer input in headless Chromium, read the prediction shown.

Skipped where selenium, chromium or chromedriver is missing (CI installs Debian's chromium and chromium-driver).
"""

import base64
import threading

import pytest
from browser import ONE, SEVEN, browser_problem, draw, start_chromium, wait_for_prediction
from click.testing import CliRunner

from xpcnn.apps.cli import main
from xpcnn.apps.serve import make_server
from xpcnn.backends.backend import get_backend
from xpcnn.data.checkpoint import load_checkpoint
from xpcnn.data.idx import read_idx, write_idx

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(browser_problem() is not None, reason=browser_problem() or ""),
]

REAL_TRAIN_IMAGES = 20_000  # enough for the seed model to read a clear 7 and 1 (at 99%+), in a few seconds


def train(data_dir, out, dataset="mnist"):
    """A seed model, one epoch: the checkpoint's run directory."""
    result = CliRunner().invoke(
        main,
        ["train", "--model", "seed", "--epochs", "1", "--batch-size", "50", "--optimizer", "adam", "--lr", "0.005"]
        + ["--device", "cpu", "--data-dir", str(data_dir), "--out", str(out), "--dataset", dataset],
    )
    assert result.exit_code == 0, result.output
    return out


def serving(run):
    """A server for a run, serving from a thread: (server, thread)."""
    server = make_server(load_checkpoint(run), get_backend("numpy"), port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def synthetic_server(synthetic_dir, tmp_path_factory):
    server, thread = serving(train(synthetic_dir, tmp_path_factory.mktemp("browser") / "run"))
    yield server
    stop(server, thread)


@pytest.fixture(scope="module")
def mnist_server(tmp_path_factory):
    """A server for a seed model trained on real MNIST (its first 20,000 training images), or skip."""
    from conftest import MNIST_DIR

    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {MNIST_DIR}")
    subset = tmp_path_factory.mktemp("mnist-subset")
    for prefix, count in [("train", REAL_TRAIN_IMAGES), ("t10k", 1000)]:
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(subset / name, read_idx(MNIST_DIR / name)[:count])
    server, thread = serving(train(subset, tmp_path_factory.mktemp("browser-mnist") / "run"))
    yield server
    stop(server, thread)


@pytest.fixture
def driver(tmp_path):
    driver = start_chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()


def shown_probabilities(driver):
    from selenium.webdriver.common.by import By

    return [float(driver.find_element(By.ID, f"bar-{digit}").get_attribute("data-probability")) for digit in range(10)]


def canvas_png(driver) -> bytes:
    """The PNG the canvas holds now, read back from the page."""
    data_url = driver.execute_script("return document.getElementById('canvas').toDataURL('image/png');")
    return base64.b64decode(data_url.split(",", 1)[1])


def post_png(server, png: bytes) -> dict:
    import http.client
    import json

    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    connection.request("POST", "/predict", body=png, headers={"Content-Type": "image/png"})
    response = connection.getresponse()
    assert response.status == 200
    answer = json.loads(response.read())
    connection.close()
    return answer


def test_the_page_shows_what_predict_answers_for_its_drawing(synthetic_server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    driver.get(synthetic_server.url)
    prediction = driver.find_element(By.ID, "prediction")
    assert prediction.get_attribute("data-state") == "empty" and shown_probabilities(driver) == [0.0] * 10

    for strokes, pointer in [(SEVEN, "mouse"), (ONE, "touch")]:
        driver.find_element(By.ID, "clear").click()
        assert prediction.get_attribute("data-state") == "empty"
        draw(driver, strokes, pointer)
        shown = wait_for_prediction(driver)
        assert prediction.get_attribute("data-state") == "done", driver.find_element(By.ID, "status").text
        answer = post_png(synthetic_server, canvas_png(driver))
        assert shown == answer["label"] == str(answer["class"])
        assert shown_probabilities(driver) == pytest.approx(answer["probabilities"], abs=1e-12)

    driver.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").read_bytes().startswith(b"\x89PNG")


def test_the_page_of_a_fashion_run_names_its_classes(synthetic_dir, driver, tmp_path):
    """It showed the bars 0-9 and the class's number for every dataset."""
    from selenium.webdriver.common.by import By

    from xpcnn.data.data import get_spec

    server, thread = serving(train(synthetic_dir, tmp_path / "run", dataset="fashion-mnist"))
    try:
        driver.get(server.url)
        names = [row.text for row in driver.find_elements(By.CSS_SELECTOR, ".bar .name")]
        assert names == list(get_spec("fashion-mnist").classes)
        assert (
            driver.title == driver.find_element(By.ID, "heading").text == "xpcnn: draw one of fashion-mnist's classes"
        )
        draw(driver, SEVEN, "mouse")
        assert wait_for_prediction(driver) == post_png(server, canvas_png(driver))["label"]
    finally:
        stop(server, thread)


@pytest.mark.slow
def test_a_model_trained_on_mnist_reads_a_drawn_seven_and_one(mnist_server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    driver.get(mnist_server.url)
    for strokes, pointer, digit in [(SEVEN, "mouse", "7"), (ONE, "touch", "1")]:
        driver.find_element(By.ID, "clear").click()
        draw(driver, strokes, pointer)
        assert wait_for_prediction(driver) == digit
        driver.save_screenshot(str(tmp_path / f"serve-{digit}.png"))
