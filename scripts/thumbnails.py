"""Pictures from the real UI: template thumbnails and the README's screenshots.

    .venv/bin/python -m scripts.thumbnails                      # all workflows + README screenshots
    .venv/bin/python -m scripts.thumbnails --models ~/ComfyUI/models --only sd_turbo_txt2img_1step

Starts a real ComfyUI server with this plugin (a throw-away base directory), opens each shipped
workflow in Debian's chromium through the page's file input (scripts/ui_driver.py, the same clicks
the browser tests make) and writes:

* ``workflows/<name>.jpg``: the thumbnail ComfyUI's template browser shows next to the template.
  It is the graph as a user sees it; when every model file the workflow names is real (found in
  ``--models``), the workflow is run and the thumbnail is its output image instead.
* ``docs/screenshots/*.png`` (unless ``--no-screenshots``): a sampling workflow after a run, the
  LoRA merge report on its node, and the ADD Training panel following a job.

Without real weights the model files are tiny random-weight stand-ins (scripts/demo_models.py):
graphs look as with real weights, but images made in the screenshots are noise.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from scripts.comfy_host import HOME, host_path  # noqa: E402
from scripts.demo_models import needed_files, prepare  # noqa: E402

WORKFLOWS = ROOT / "workflows"
SHOTS = ROOT / "docs" / "screenshots"
THUMB_WIDTH = 768

# Small enough for a CPU; used only for the README screenshots' runs (the graphs keep their values
# in the thumbnails).
CPU_SIZED = {
    "ADDTrain": dict(width=64, height=64, batch_size=2, max_steps=60, data_steps=2, save_every=0, preview_every=2,
                     run_mode="alongside", name="picture_run"),
    "ADDCompare": dict(width=64, height=64, teacher_steps=2),
}

_GRAPH_BOX = """() => {
  const c = window.app.canvas, ds = c.ds, rect = c.canvas.getBoundingClientRect();
  const title = (window.LiteGraph && LiteGraph.NODE_TITLE_HEIGHT) || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of window.app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const sx = (x) => rect.left + (x + ds.offset[0]) * ds.scale, sy = (y) => rect.top + (y + ds.offset[1]) * ds.scale;
  return {x: sx(x0), y: sy(y0), width: (x1 - x0) * ds.scale, height: (y1 - y0) * ds.scale};
}"""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jpeg(png: bytes, width: int = THUMB_WIDTH) -> bytes:
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def _clip(box: dict, margin: float, page) -> dict:
    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    x, y = max(0.0, box["x"] - margin), max(0.0, box["y"] - margin)
    return {"x": x, "y": y, "width": min(vw - x, box["width"] + 2 * margin), "height": min(vh - y, box["height"] + 2 * margin)}


def graph_picture(cp, aspect: float | None = 4 / 3) -> bytes:
    """PNG of the graph as it is on the canvas, cropped to its nodes; ``aspect``: widen the short
    side to this width/height ratio (the template browser's 4:3 cards) around the graph's centre."""
    cp.fit_view()
    box = cp.page.evaluate(_GRAPH_BOX)
    png = cp.page.screenshot(clip=_clip(box, 16, cp.page))
    if aspect is None:
        return png
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = max(img.width, round(img.height * aspect)), max(img.height, round(img.width / aspect))
    canvas = Image.new("RGB", (w, h), img.getpixel((2, 2)))  # the canvas background around the graph
    canvas.paste(img, ((w - img.width) // 2, (h - img.height) // 2))
    out = io.BytesIO()
    canvas.save(out, "PNG")
    return out.getvalue()


def node_picture(cp, node_type: str, margin: float = 24) -> bytes:
    """PNG of one node (the first of a type), centred and zoomed so its text is readable."""
    cp.page.evaluate("""(type) => {
        const n = window.app.graph._nodes.find(n => n.type === type);
        const c = window.app.canvas;
        c.ds.scale = 1.0;
        const rect = c.canvas.getBoundingClientRect();
        c.ds.offset[0] = rect.width / 2 / c.ds.scale - (n.pos[0] + n.size[0] / 2);
        c.ds.offset[1] = rect.height / 2 / c.ds.scale - (n.pos[1] + n.size[1] / 2);
        c.setDirty(true, true);
    }""", node_type)
    time.sleep(0.5)
    box = cp.page.evaluate("""(type) => {
        const n = window.app.graph._nodes.find(n => n.type === type), c = window.app.canvas, ds = c.ds;
        const rect = c.canvas.getBoundingClientRect(), title = LiteGraph.NODE_TITLE_HEIGHT || 30;
        return {x: rect.left + (n.pos[0] + ds.offset[0]) * ds.scale, y: rect.top + (n.pos[1] - title + ds.offset[1]) * ds.scale,
                width: n.size[0] * ds.scale, height: (n.size[1] + title) * ds.scale};
    }""", node_type)
    return cp.page.screenshot(clip=_clip(box, margin, cp.page))


def _real_for(workflow: Path, stood_in: list[str]) -> bool:
    with tempfile.TemporaryDirectory() as empty:
        names = needed_files(Path(empty), extra=(workflow,))
    return not any(f"{folder}/{name}" in stood_in for name, (folder, _tiny) in names.items() if folder != "input")


def _link_real(models: Path | None, home: Path) -> None:
    """Link the real model files the workflows name into the server's models folder."""
    if models is None:
        return
    for name, (folder, _tiny) in needed_files().items():
        src = models / folder / name
        dst = home / "models" / folder / name
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve())


def _run_output_png(cp, server) -> bytes | None:
    end = cp.run(timeout=1800)
    if end["kind"] != "execution_success":
        raise RuntimeError(f"the workflow failed: {json.dumps(end)[:2000]}")
    saved = cp.output_images(end["prompt_id"], ("output",))
    if not saved:
        return None
    cp.wait_images_shown(cp.output_images(end["prompt_id"]))
    name = next(iter(saved.values()))[0]
    data = cp.page.evaluate("""async (name) => {
        const r = await fetch(`/api/view?type=output&filename=${encodeURIComponent(name)}`);
        return Array.from(new Uint8Array(await r.arrayBuffer()));
    }""", name)
    return bytes(data)


def thumbnails(cp, server, workflows: list[Path], stood_in: list[str] | None, out_dir: Path | None = None) -> list[Path]:
    """Write ``<name>.jpg`` beside each workflow (or into ``out_dir``); returns the paths.
    ``stood_in``: the model files that are stand-ins ("folder/name"); None: all of them."""
    written = []
    for wf in workflows:
        cp.open_workflow(wf)
        problems = cp.problems()
        if problems:
            raise RuntimeError(f"{wf.name} does not load cleanly in the page: {problems}")
        png = None
        if stood_in is not None and _real_for(wf, stood_in):
            print(f"[pictures] {wf.stem}: real weights present, running it for its output", flush=True)
            png = _run_output_png(cp, server)
        if png is None:
            png = graph_picture(cp)
        out = (out_dir / wf.name if out_dir else wf).with_suffix(".jpg")
        _write_atomic(out, _jpeg(png))
        written.append(out)
        print(f"[pictures] {out}", flush=True)
    return written


def _size_for_cpu(cp) -> None:
    for node_type, values in CPU_SIZED.items():
        cp.set_widgets(node_type, values)


def screenshots(cp, server) -> list[Path]:
    written = []
    # 1. A sampling workflow after a run: the graph with its output on the Save Image node.
    cp.open_workflow(WORKFLOWS / "sd_turbo_txt2img_1step.json")
    end = cp.run(timeout=1800)
    assert end["kind"] == "execution_success", end
    cp.wait_images_shown(cp.output_images(end["prompt_id"]))
    _write_atomic(SHOTS / "sampling_workflow.png", graph_picture(cp, aspect=None))
    written.append(SHOTS / "sampling_workflow.png")

    # 2. The LoRA merge report, shown on the ADD LoRA Merge node after a run.
    cp.open_workflow(WORKFLOWS / "lcm_lora_merge_4step.json")
    end = cp.run(timeout=1800)
    assert end["kind"] == "execution_success", end
    cp.page.wait_for_function("""() => window.app.graph._nodes.some(n => n.type === 'ADDLoraMerge'
                                 && (n.widgets || []).some(w => w.name === 'add_status' && w.element.value))""")
    cp.page.evaluate("""() => { const n = window.app.graph._nodes.find(n => n.type === 'ADDLoraMerge');
                                const w = n.widgets.find(w => w.name === 'add_status'); w.element.rows = 14;
                                n.setSize([Math.max(n.size[0], 520), n.computeSize()[1] + 160]); }""")
    _write_atomic(SHOTS / "lora_merge_report.png", node_picture(cp, "ADDLoraMerge"))
    written.append(SHOTS / "lora_merge_report.png")

    # 3. The ADD Training panel following a job started from the page.
    cp.open_workflow(WORKFLOWS / "add_train_lora.json")
    _size_for_cpu(cp)
    cp.page.get_by_role("button", name="Run").first.click()
    cp.training_panel_button().click()
    card = cp.page.locator("[data-job-name='picture_run']").first
    card.wait_for(timeout=300_000)
    cp.page.wait_for_function("""() => { const i = document.querySelector("[data-job-name='picture_run'] [data-testid='add-preview']");
                                         const p = document.querySelector("[data-job-name='picture_run'] [data-testid='add-progress']");
                                         return i && i.complete && i.naturalWidth > 0 && p && Number(p.dataset.step) >= 8; }""",
                              timeout=600_000)
    written.append(cp.screenshot(SHOTS / "training_panel.png"))
    card.locator("[data-testid='add-cancel']").click()
    cp.training_panel_button().click()
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=None,
                    help="a ComfyUI models folder with real weights (checkpoints/, vae_approx/, loras/); default: "
                         "this checkout's own (.comfy_home/models) or $COMFYUI_PATH/models")
    ap.add_argument("--only", nargs="*", default=None, help="workflow names (without .json) to make thumbnails of")
    ap.add_argument("--no-screenshots", action="store_true", help="thumbnails only")
    a = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from scripts.comfy_server import running_server
    from scripts.ui_driver import ComfyPage

    models = a.models or ((Path(os.environ["COMFYUI_PATH"]) / "models") if os.environ.get("COMFYUI_PATH")
                          else HOME / "models")
    workflows = sorted(WORKFLOWS.glob("*.json"))
    if a.only:
        unknown = sorted(set(a.only) - {w.stem for w in workflows})
        if unknown:
            raise SystemExit(f"--only: no workflow named {', '.join(unknown)} in {WORKFLOWS}")
        workflows = [w for w in workflows if w.stem in a.only]
    host_path()  # fail early, with the fix, when there is no ComfyUI
    with tempfile.TemporaryDirectory(prefix="add_pictures_") as tmp:
        home = Path(tmp)
        real = [models] if models.is_dir() else []
        stood_in = prepare(real, home / "models", home / "input")
        _link_real(models if real else None, home)
        if stood_in:
            print("[pictures] stand-ins (no real weights) for: " + ", ".join(stood_in), flush=True)
        with running_server(home) as server, sync_playwright() as p:
            server.post("/settings/Comfy.TutorialCompleted", True)
            cp = ComfyPage(p, server.url, viewport=(1600, 1000))
            try:
                cp.picture_settings()
                thumbnails(cp, server, workflows, stood_in)
                if not a.no_screenshots:
                    for path in screenshots(cp, server):
                        print(f"[pictures] {path.relative_to(ROOT)}", flush=True)
            finally:
                cp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
