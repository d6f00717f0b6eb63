"""The ai-models dashboard in a real browser (Debian's headless Chromium driven by Playwright) against the service on
a loopback server: the model list with states, starting a model, the test form, the live charts, the comparison
view, the Korean/English labels, and a chat answer rated with its thumbs buttons."""

from __future__ import annotations

import json
import shutil

import pytest
from service_world import NAME, live_server, served_world

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with served_world(tmp_path_factory.mktemp("dash"), canary_analysis=False) as world, live_server(world.app) as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.world = world
        page.goto(f"{url}/ai-models")
        yield page
        browser.close()


def test_the_page_asks_for_a_key_then_lists_the_models(page):
    page.wait_for_selector("#error:has-text('401')")
    page.fill("#apikey", page.world.keys["admin"])
    page.dispatch_event("#apikey", "change")
    page.wait_for_selector("#models tbody tr[data-id='v1']")
    rows = page.locator("#models tbody tr")
    assert rows.count() == 2 and page.locator("#models tbody tr").first.get_attribute("data-id") == "v2"
    assert "staging (current)" in page.inner_text("#models tr[data-id='v2']")
    assert page.inner_text("h1") == "AI 모델 관리"


def test_start_button_loads_the_model(page):
    page.click("#models tr[data-id='v1'] button[data-action='start']")
    page.wait_for_selector("#models tr[data-id='v1'] .state.loaded")
    assert page.world.releases["1"].ollama_tag in page.world.double.loaded


def test_the_test_form_shows_answer_latency_and_tokens_and_the_chart_follows(page):
    page.select_option("#test-model", "v2")
    page.fill("#test-prompt", "재고 이동은 어떻게 하나요?")
    page.click("#test-run")
    page.wait_for_function("document.querySelector('#test-answer').textContent.length > 0")
    assert page.inner_text("#test-answer") == page.world.double.answer
    assert "s" in page.inner_text("#test-figures")
    sent = [b for m, p, b in page.world.double.request_json if p == "/api/chat"][-1]
    assert sent["model"] == f"{NAME}:staging" and sent["options"] == {"temperature": 0, "num_predict": 64}
    page.select_option("#live-model", "v2")
    page.wait_for_function("Number(document.querySelector('#latency-chart').dataset.points || 0) > 0")
    assert int(page.locator("#live-figures").get_attribute("data-requests")) >= 1


def test_bad_parameters_are_caught_in_the_page(page):
    page.fill("#test-params", "{not json")
    page.click("#test-run")
    page.wait_for_selector("#error:has-text('JSON')")
    page.fill("#test-params", '{"temperature": 0, "num_predict": 64}')


def test_compare_view_and_english_labels(page, tmp_path):
    world = page.world
    world.double.answers[world.releases["1"].ollama_tag] = "I cannot help with that."
    world.double.answers[f"{NAME}:staging"] = "Post accruals and lock the period."
    cases = [{"id": f"c{i}", "question": f"How do I close period {i}?", "reference": f"Post accruals and lock period {i}."}
             for i in range(6)]
    page.click("#lang")
    assert page.inner_text("h1") == "AI model management"
    page.select_option("#cmp-a", "v1")
    page.select_option("#cmp-b", "v2")
    page.fill("#cmp-cases", "\n".join(json.dumps(c) for c in cases))
    page.click("#cmp-run")
    page.wait_for_selector("#comparison tr[data-metric='rouge_l']")
    row = page.locator("#comparison tr[data-metric='rouge_l'] td").all_inner_texts()
    assert row[-1] == "better" and float(row[2]) > float(row[1])
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    world.double.answers.clear()


def test_a_chat_answer_is_rated_with_a_correction(page):
    import mlflow

    page.fill("#chat-message", "재고 이동은 어떻게 등록하나요?")
    page.click("#chat-send")
    page.wait_for_selector("#feedback:not([hidden])")
    assert page.inner_text("#chat-answer").strip()
    page.fill("#fb-correction", "MIGO에서 이전 전기로 등록합니다.")
    page.click("#fb-down")
    page.wait_for_function("document.getElementById('fb-status').textContent.length > 0")
    assert page.locator("#fb-up").is_disabled() and page.inner_text("#error") == ""
    trace_id = page.evaluate("chatTrace")
    got = {a.name: a.value for a in mlflow.get_trace(trace_id).info.assessments}
    assert got == {"user_verdict": False, "expected_response": "MIGO에서 이전 전기로 등록합니다."}
