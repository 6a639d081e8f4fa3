"""Drive the real ComfyUI front end in a real browser, the way a user does.

Debian's ``chromium`` (no browser download) driven by Playwright from PyPI, headless. Used by the
browser tests (tests/test_browser.py) and by the picture script (scripts/thumbnails.py), so what
the tests check and what the README shows come from the same clicks:

* a workflow file is opened through the page's own file input (what Workflow > Open and
  drag-and-drop use), not injected into the graph;
* problems a user would see are read from the page: the "missing nodes" dialog, a "Prompt
  execution failed" dialog, error toasts, node types the page does not know, combo values that
  are not among the server's choices;
* runs are started with the Run button and followed through the server's own websocket events.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


# Installed once per page: records every run's end (success, error or interrupt) by prompt id.
_RUN_RECORDER = """() => {
  if (window.__addRuns) return;
  window.__addRuns = [];
  const api = window.app.api;
  for (const kind of ["execution_success", "execution_error", "execution_interrupted"]) {
    api.addEventListener(kind, (e) => window.__addRuns.push({kind, ...(e.detail || {})}));
  }
}"""

# What would stop a user, read from the page (not from the server).
_PROBLEMS = """() => {
  const out = [];
  for (const d of document.querySelectorAll('.p-dialog')) out.push('dialog: ' + d.innerText.slice(0, 600));
  for (const t of document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn'))
    out.push('toast: ' + t.innerText.slice(0, 300));
  for (const n of window.app.graph._nodes) {
    if (!LiteGraph.registered_node_types[n.type]) out.push(`unknown node type ${n.type} (node ${n.id})`);
    if (n.has_errors) out.push(`node ${n.id} (${n.type}) is marked with errors`);
    for (const w of n.widgets || []) {
      const values = w.options && w.options.values;
      if (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value))
        out.push(`node ${n.id} (${n.type}) widget ${w.name}: ${JSON.stringify(w.value)} is not one of its choices`);
    }
  }
  return out;
}"""


class ComfyPage:
    """One browser tab on a running ComfyUI server."""

    def __init__(self, playwright, url: str, viewport=(1500, 950)):
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("Debian's chromium is not installed: `apt-get install -y chromium` (bash scripts/test.sh does it)")
        self.browser = playwright.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        self.page = self.browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.url = url
        self.page.goto(url)
        self.page.wait_for_function("window.app && window.app.graph && window.app.extensionManager", timeout=90_000)
        time.sleep(1)
        self.close_dialogs()
        self.close_banners()
        self.page.evaluate(_RUN_RECORDER)

    def close(self) -> None:
        self.browser.close()

    # -- what covers the canvas -------------------------------------------------------------
    def close_dialogs(self) -> None:
        """Close dialogs (e.g. the first-run template browser) as a user would."""
        page = self.page
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

    def close_banners(self) -> None:
        """Dismiss the front end's announcement banner (its x button), as a user would."""
        banner_close = self.page.locator("button:has(i[class*='lucide--x'])").filter(
            has=self.page.locator("xpath=..").filter(has_text="Introducing"))
        x = self.page.locator("div:has(> div > span:text-matches('^Introducing')) > button")
        for loc in (x, banner_close):
            if loc.count():
                loc.first.click()
                time.sleep(0.3)
                return

    def picture_settings(self) -> None:
        """Settings for pictures: full node detail at any zoom, no minimap over the canvas."""
        self.page.evaluate("""async () => {
            const s = window.app.extensionManager.setting;
            await s.set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
            await s.set('Comfy.Minimap.Visible', false);
        }""")
        time.sleep(0.3)

    # -- the graph --------------------------------------------------------------------------
    def open_workflow(self, path: Path) -> list[str]:
        """Open a workflow file through the page's file input; returns the node types loaded."""
        # Mark the nodes on the canvas now: the file is loaded once none of them is left.
        self.page.evaluate("() => window.app.graph._nodes.forEach(n => { n.__addOld = true; })")
        self.page.locator("#comfy-file-input").set_input_files(str(path))
        self.page.wait_for_function(
            "(n) => window.app.graph._nodes.length === n && !window.app.graph._nodes.some(x => x.__addOld)",
            arg=_count_nodes(path), timeout=30_000)
        time.sleep(0.5)
        return self.page.evaluate("() => window.app.graph._nodes.map(n => n.type)")

    def problems(self) -> list[str]:
        return self.page.evaluate(_PROBLEMS)

    def set_widgets(self, node_type: str, values: dict) -> int:
        """Type values into widgets of every node of a type, as a user edits them. Returns the count."""
        return self.page.evaluate("""([type, values]) => {
            const nodes = window.app.graph._nodes.filter(n => n.type === type);
            for (const node of nodes) for (const [k, v] of Object.entries(values)) {
                const w = node.widgets.find(w => w.name === k);
                if (!w) throw new Error(`no widget ${k} on ${type}`);
                w.value = v;
                w.callback?.(v);
            }
            return nodes.length;
        }""", [node_type, values])

    def set_seed_control(self, mode: str = "increment") -> int:
        """Set every 'control after generate' widget (seed widgets) to a mode. Returns how many."""
        return self.page.evaluate("""(mode) => {
            let n = 0;
            for (const node of window.app.graph._nodes) for (const w of node.widgets || [])
                if (w.name === 'control_after_generate') { w.value = mode; n++; }
            return n;
        }""", mode)

    def widget_values(self, node_type: str, name: str) -> list:
        return self.page.evaluate("""([type, name]) => window.app.graph._nodes.filter(n => n.type === type)
            .map(n => (n.widgets.find(w => w.name === name) || {}).value)""", [node_type, name])

    def training_panel_button(self):
        """The sidebar button of the ADD Training panel, as a user finds it: front ends up to 1.49 give a
        custom tab's button the class ``<id>-tab-button``; newer ones (1.58) only its tooltip as label."""
        return self.page.locator(".add-training-tab-button, button.side-bar-button[aria-label^='ADD Training']").first

    def fit_view(self) -> None:
        """Frame the whole graph (the front end's 'fit view', key '.')."""
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        time.sleep(0.5)

    # -- running ----------------------------------------------------------------------------
    def runs(self) -> list[dict]:
        return self.page.evaluate("() => window.__addRuns")

    def run(self, timeout: float = 300) -> dict:
        """Press Run and wait for that run to end; returns its end event (kind, prompt_id, ...)."""
        done = len(self.runs())
        self.page.get_by_role("button", name="Run").first.click()
        t0 = time.time()
        while len(self.runs()) <= done:
            problems = [p for p in self.problems() if p.startswith("dialog")]
            if problems:  # a validation failure ends nothing: the page shows a dialog instead
                return {"kind": "rejected", "problems": problems}
            if time.time() - t0 > timeout:
                raise TimeoutError(f"the run did not end within {timeout:.0f} s")
            time.sleep(0.5)
        return self.runs()[done]

    def output_images(self, prompt_id: str, types=("output", "temp", "input")) -> dict[str, list[str]]:
        """node id -> file names of the images a finished run gave its nodes to show (the server's
        history); ``types``: which of ComfyUI's folders (output = saved, temp = previews, input)."""
        hist = self.page.evaluate("(id) => fetch(`/api/history/${id}`).then(r => r.json())", prompt_id)
        outputs = hist.get(prompt_id, {}).get("outputs", {})
        found = {nid: [i["filename"] for i in out.get("images", []) if i.get("type") in types]
                 for nid, out in outputs.items()}
        return {nid: names for nid, names in found.items() if names}

    def wait_images_shown(self, expected: dict[str, list[str]], timeout: float = 60) -> dict[str, list[str]]:
        """Wait until each node shows exactly the expected images, loaded (decoded, non-empty) in the page."""
        self.page.wait_for_function("""(expected) => Object.entries(expected).every(([id, names]) => {
            const n = window.app.graph.getNodeById(Number(id));
            if (!n || !n.imgs || n.imgs.length !== names.length) return false;
            return n.imgs.every((img, k) => img.complete && img.naturalWidth > 0
                                             && new URL(img.src).searchParams.get('filename') === names[k]);
        })""", arg=expected, timeout=timeout * 1000)
        return self.shown_images()

    def shown_images(self) -> dict[str, list[str]]:
        """node id -> file names of the images each node shows now."""
        return self.page.evaluate("""() => Object.fromEntries(window.app.graph._nodes
            .filter(n => n.imgs && n.imgs.length)
            .map(n => [String(n.id), n.imgs.map(i => new URL(i.src).searchParams.get('filename'))]))""")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path


def _count_nodes(path: Path) -> int:
    import json

    wf = json.loads(Path(path).read_text())
    return len(wf.get("nodes", []))
