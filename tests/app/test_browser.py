"""The page at `/` and the interactive docs in a real browser: Debian's Chromium driven by Playwright.

Outside CI these tests skip when Chromium or Playwright is missing; in CI (`CI` set) they fail,
since .ci/run installs both.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from app.checkpoint import build_model, load_checkpoint
from app.loading import load_model
from app.model import CLASSES
from app.preprocess import load_image, normalize

from ..live import REPO, SHIPPED, live_service

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)

SAMPLES = sorted((REPO / "samples").glob("*.jpg"))


def _need(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is needed for the browser tests in CI")
    pytest.skip(f"{what} is not installed (CI installs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright (pip)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        _need("chromium (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def service(lite_weights) -> Iterator[str]:
    with live_service(CIFAR10_LITE_WEIGHTS=str(lite_weights)) as url:
        yield url


@pytest.fixture
def page(browser, service):
    """A fresh page that records every request it makes."""
    context = browser.new_context()
    page = context.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    yield page
    context.close()


def outside(requests: list[str], base: str) -> list[str]:
    return [u for u in requests if not u.startswith((base + "/", "blob:", "data:"))]


def expected_label(path, weights=SHIPPED) -> str:
    with torch.no_grad():
        logits = build_model(load_checkpoint(weights))(normalize(load_image(path).unsqueeze(0)))
    return CLASSES[int(logits.argmax())]


def test_choosing_a_cifar10_jpeg_shows_its_label(page, service):
    page.goto(service + "/")
    page.set_input_files("#files", [str(SAMPLES[0]), str(SAMPLES[8])])
    page.wait_for_selector(".result >> nth=1")
    shown = page.locator(".result .predicted").all_text_contents()
    assert shown == [expected_label(SAMPLES[0]), expected_label(SAMPLES[8])]
    assert page.locator(".result .name").all_text_contents() == [SAMPLES[0].name, SAMPLES[8].name]
    assert page.locator(".result").first.locator(".bar").count() == 3  # top 3 by default
    status = page.locator("#status").text_content()
    assert "model FinalModel" in status and " ms" in status
    assert outside(page.requests, service) == []


def test_the_small_model_can_be_chosen(page, service, lite_weights):
    page.goto(service + "/")
    page.select_option("#model", "lite")
    page.set_input_files("#files", str(SAMPLES[2]))
    page.wait_for_selector(".result")
    shown = page.locator(".result .predicted").all_text_contents()
    assert shown == [expected_label(SAMPLES[2], lite_weights)]
    assert "model LiteModel" in page.locator("#status").text_content()


def test_an_error_answer_is_shown_not_swallowed(page, service, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    page.goto(service + "/")
    page.set_input_files("#files", str(text))
    page.wait_for_selector("#status.error")
    assert "Error 415" in page.locator("#status").text_content()
    assert page.locator(".result").count() == 0


def test_the_page_is_keyboard_usable(page, service):
    page.goto(service + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"  # the chooser comes first
    assert page.evaluate("document.activeElement.type") == "file"  # a real input: Enter/Space open it
    page.set_input_files("#files", str(SAMPLES[3]))
    page.wait_for_selector(".result")
    # then the controls, in order, and Enter on the button classifies again at the chosen top-k
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "topk"
    page.keyboard.press("ArrowDown")  # 3 -> 5
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "model"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "explain"
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "go"
    page.keyboard.press("Enter")
    page.locator(".result .bar").nth(4).wait_for()  # (the page's CSP forbids wait_for_function's eval)
    assert page.locator(".result .bar").count() == 5
    assert page.locator(".result .predicted").text_content() == expected_label(SAMPLES[3])


def test_the_page_says_when_the_model_is_unsure_and_shows_where_it_looked(page, service, tmp_path):
    noise = tmp_path / "noise.png"
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.numpy()).save(noise)
    pictures = [SAMPLES[1], noise]
    flags = (
        load_model(SHIPPED, torch.device("cpu")).answer(torch.stack([load_image(p) for p in pictures])).unsure
    )
    assert flags is not None and flags.tolist() == [False, True]  # what the page must show
    page.goto(service + "/")
    page.check("#explain")
    page.set_input_files("#files", [str(p) for p in pictures])
    page.wait_for_selector(".result >> nth=1")
    results = page.locator(".result")
    assert results.nth(0).locator(".unsure").count() == 0
    assert (
        "does not look like the photos this model knows" in results.nth(1).locator(".unsure").text_content()
    )
    # a heatmap over each thumbnail, its 32x32 pixels drawn with varying strength
    assert page.locator(".thumb canvas").count() == 2
    alphas = page.evaluate(
        "Array.from(document.querySelector('.thumb canvas').getContext('2d')"
        ".getImageData(0, 0, 32, 32).data.filter((_, i) => i % 4 === 3))"
    )
    assert len(alphas) == 1024 and max(alphas) > 150 and min(alphas) < 20


def test_the_page_fits_a_phone(browser, service):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    page = context.new_page()
    page.goto(service + "/")
    page.set_input_files("#files", [str(p) for p in SAMPLES[:2]])
    page.wait_for_selector(".result >> nth=1")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # no sideways scrolling
    context.close()


def test_swagger_try_it_out_uploads_files_and_shows_predictions(page, service):
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.goto(service + "/docs")
    op = page.locator(".opblock-post", has_text="/predict").first
    op.locator(".opblock-summary").click()
    op.locator(".try-out__btn").click()
    chooser = op.locator("input[type=file]")
    assert chooser.count() == 1  # a file chooser, not a text box
    assert "array<file>" in op.text_content() and "Add file item" in op.text_content()
    assert page.locator(".btn.authorize").count() == 0  # no key is configured: nothing to authorize
    assert page.locator(".opblock-tag", has_text="v2").count() == 1  # the v2 routes are listed
    chooser.set_input_files(str(SAMPLES[8]))
    op.locator(".execute").click()
    status = op.locator(".live-responses-table .response .response-col_status").first
    status.wait_for(timeout=30_000)
    assert status.text_content().strip() == "200"
    body = op.locator(".live-responses-table .response-col_description .microlight").first.text_content()
    assert f'"label": "{expected_label(SAMPLES[8])}"' in body and '"filename": "ship.jpg"' in body
    assert outside(page.requests, service) == []
    assert console == []  # no "Could not find component", no failed request (a favicon's 404)


def test_the_docs_make_no_request_outside_the_service(page, service):
    for path in ("/docs", "/redoc"):
        page.goto(service + path, wait_until="networkidle")
    page.wait_for_selector("redoc h1, .api-info h2, h1", timeout=30_000)
    assert any(u.endswith("/openapi.json") for u in page.requests)  # both pages really loaded the API
    assert outside(page.requests, service) == []


def test_redoc_renders_every_operation_without_an_error(page, service):
    """ReDoc builds an example of every request body; a schema reference it cannot resolve (a
    body's own `$defs`) is an error in the console."""
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.goto(service + "/redoc", wait_until="networkidle")
    page.wait_for_selector("redoc h1, .api-info h2, h1", timeout=30_000)
    assert page.get_by_text("Classify images with model best (Open Inference Protocol)").count() > 0
    assert [line for line in console if line.startswith("error")] == []
