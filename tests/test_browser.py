"""What a user sees: the ADD Training panel in a real browser (Debian's chromium, headless, driven by
Playwright with that binary; no browser download) against the real ComfyUI front end and server.

A training job is started from the page (the shipped add_train_lora workflow loaded into the graph,
sized for a CPU, queued with the page's own Queue), then the panel shows it: progress advancing, a
loss plot, a preview image, and Cancel.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from scripts.comfy_host import ROOT

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the test set-up installs it; a bare environment skips with the reason
    sync_playwright = None


@pytest.fixture(scope="module")
def browser_page(comfy_server):
    if sync_playwright is None:
        pytest.skip("playwright is not installed: run bash scripts/test.sh (it installs the test tools)")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed: run bash scripts/test.sh as root (it apt-installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        # A returning user: the first-run template browser would cover the canvas.
        comfy_server.post("/settings/Comfy.TutorialCompleted", True)
        page.goto(comfy_server.url)
        page.wait_for_function("window.app && window.app.graph && window.app.extensionManager", timeout=90_000)
        time.sleep(1)
        _close_dialogs(page)
        page.errors = errors
        yield page
        browser.close()


def _close_dialogs(page) -> None:
    """Close what a first start opens over the canvas (the template browser), as a user would."""
    for _ in range(10):
        if page.locator(".p-dialog-mask").count() == 0:
            return
        close = page.locator(".p-dialog .p-dialog-close-button, .p-dialog button[aria-label='Close']")
        if close.count():
            close.first.click()
        else:
            page.keyboard.press("Escape")
        time.sleep(0.5)
    raise AssertionError("a dialog stays open: " + page.locator(".p-dialog").first.inner_text()[:300])


def _job_card(page):
    return page.locator("[data-testid^='add-job-']").first


def test_training_panel_follows_a_job_started_from_the_page(browser_page, comfy_server, tmp_path):
    page = browser_page
    wf = json.loads((ROOT / "workflows" / "add_train_lora.json").read_text())
    # Load the shipped workflow through the page, size it for a CPU, queue it from the page.
    missing = page.evaluate(
        """async (wf) => {
            await window.app.loadGraphData(wf);
            const set = (type, values) => {
                for (const node of window.app.graph._nodes.filter(n => n.type === type)) {
                    for (const [k, v] of Object.entries(values)) {
                        const w = node.widgets.find(w => w.name === k);
                        if (!w) throw new Error(`no widget ${k} on ${type}`);
                        w.value = v;
                    }
                }
            };
            set("ADDTrain", {name: "browser_run", width: 64, height: 64, batch_size: 2, max_steps: 400,
                             data_steps: 2, student_timesteps: "999,499", lora_rank: 4, lora_alpha: 4,
                             preview_every: 2, save_every: 0, run_mode: "alongside"});
            set("ADDCompare", {width: 64, height: 64, teacher_steps: 2});
            const missing = window.app.graph._nodes.filter(n => !n.constructor || n.constructor.name === "LGraphNode"
                                                             && !LiteGraph.registered_node_types[n.type]).map(n => n.type);
            await window.app.queuePrompt(0, 1);
            return missing;
        }""", wf)
    assert missing == []
    _close_dialogs(page)
    page.locator(".add-training-tab-button").click()
    card = _job_card(page)
    card.wait_for(timeout=120_000)
    assert "browser_run" in card.inner_text()

    # progress advances in the panel (driven by the server's add.job events)
    def shown_step():
        return int(card.locator("[data-testid='add-progress']").get_attribute("data-step"))
    first = shown_step()
    t0 = time.time()
    while shown_step() < max(first + 2, 4):
        assert time.time() - t0 < 120, f"panel stuck at step {shown_step()}"
        assert card.locator("[data-testid='add-state']").inner_text() != "failed", card.inner_text()
        time.sleep(0.5)
    assert card.locator("[data-testid='add-loss-plot']").count() == 1
    preview = card.locator("[data-testid='add-preview']")
    preview.wait_for(timeout=60_000)
    page.wait_for_function("""() => { const i = document.querySelector("[data-testid='add-preview']");
                                      return i && i.complete && i.naturalWidth > 0; }""", timeout=30_000)
    text = card.inner_text()
    assert "it/s" in text and "ETA" in text and "D " in text

    shots = ROOT / "out" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(tmp_path / "training_panel.png"))
    shutil.copy(tmp_path / "training_panel.png", shots / "training_panel.png")

    # Cancel from the panel: the job stops at a step boundary, saved
    card.locator("[data-testid='add-cancel']").click()
    page.wait_for_function("""() => { const s = document.querySelector("[data-testid^='add-job-'] [data-testid='add-state']");
                                      return s && s.textContent === 'cancelled'; }""", timeout=120_000)
    jobs = [j for j in comfy_server.get("/add/jobs")["jobs"] if j["name"] == "browser_run"]
    assert jobs and jobs[-1]["state"] == "cancelled" and jobs[-1]["last_checkpoint_step"] == jobs[-1]["step"]
    assert (Path(comfy_server.home) / "models" / "loras" / "browser_run.safetensors").is_file()

    # the ADD Train node shows its status line on the canvas
    shown = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type === 'ADDTrain')
                                 .map(n => (n.widgets.find(w => w.name === 'add_status') || {}).element?.value || '')""")
    assert shown and "browser_run" in shown[0]
    ours = [e for e in page.errors if "add_training" in e or "comfyui-add" in e]
    assert ours == [], ours
