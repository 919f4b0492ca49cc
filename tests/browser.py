"""Driving xpcnn serve's page in headless Chromium (selenium): start the browser, draw strokes, read the answer.

Shared by tests/test_browser.py and scripts/serve_screenshot.py.  Needs the ``browser`` extra (selenium) and
Debian's ``chromium`` and ``chromium-driver`` (or the same programs elsewhere on PATH).
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Canvas pixels (the canvas is 280x280): a "7" and a "1" as a person draws them, one list of points per stroke.
SEVEN = [[(75, 65), (140, 65), (205, 65), (165, 150), (125, 230)]]
ONE = [[(150, 40), (145, 110), (140, 170), (135, 240)]]


def browser_problem() -> str | None:
    """Why the browser cannot run here (selenium, chromium or chromedriver missing), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[browser]')"
    if chromium_path() is None:
        return "chromium is not installed (Debian: apt-get install chromium)"
    if chromedriver_path() is None:
        return "chromedriver is not installed (Debian: apt-get install chromium-driver)"
    return None


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromedriver_path() -> str | None:
    return shutil.which("chromedriver")


def start_chromium(profile_dir: Path, viewport=(720, 420)):
    """Headless Chromium with a fresh profile, quiet on an offline machine, showing viewport=(width, height)
    CSS pixels of page: a selenium WebDriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium_path()
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile_dir}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver_path()))
    # The window's size includes the (invisible) browser frame: measure it, then size the window around the page.
    frame = driver.execute_script("return [outerWidth - innerWidth, outerHeight - innerHeight];")
    driver.set_window_size(viewport[0] + frame[0], viewport[1] + frame[1])
    return driver


def draw(driver, strokes, pointer: str = "mouse") -> None:
    """Draw strokes on the page's canvas with real pointer input ("mouse" or "touch"), in canvas pixels."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    kind = {"mouse": interaction.POINTER_MOUSE, "touch": interaction.POINTER_TOUCH}[pointer]
    actions = ActionBuilder(driver, mouse=PointerInput(kind, pointer), duration=20)
    half_width, half_height = canvas.size["width"] / 2, canvas.size["height"] / 2
    for stroke in strokes:
        # W3C actions place points relative to the element's centre.
        points = [(round(x - half_width), round(y - half_height)) for x, y in stroke]
        actions.pointer_action.move_to(canvas, *points[0]).pointer_down()
        for point in points[1:]:
            actions.pointer_action.move_to(canvas, *point)
        actions.pointer_action.pointer_up()
    actions.perform()


def wait_for_prediction(driver, timeout: float = 15) -> str:
    """Wait until the page shows the answer to its latest request; the text of #prediction."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    prediction = driver.find_element(By.ID, "prediction")
    WebDriverWait(driver, timeout).until(lambda _: prediction.get_attribute("data-state") in ("done", "error"))
    return prediction.text
