"""Start ComfyUI with this plugin (``bash scripts/run.sh``), or run one workflow headless.

    bash scripts/run.sh                          # UI at http://127.0.0.1:8188
    bash scripts/run.sh --headless sd_turbo_txt2img_1step   # name or path of a workflow; prints PNG paths

Shipped workflows name real model files. Any that are missing get tiny random-weight stand-ins
(see scripts/demo_models.py), and this script says so: images made with them are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

from scripts.comfy_client import ComfyClient  # noqa: E402
from scripts.comfy_host import HOME, free_port, host_path  # noqa: E402
from scripts.demo_models import extra_paths_yaml, prepare  # noqa: E402
from scripts.workflow_api import WorkflowError, load, to_api  # noqa: E402

REAL_WEIGHTS_HELP = """\
Where real weights go (the shipped workflows use these names):
  checkpoints/  sd_turbo.safetensors, sdxl_turbo_1.0_fp16.safetensors, v1-5-pruned-emaonly.safetensors
  vae_approx/   taesd_decoder.safetensors, taesd_encoder.safetensors, taesdxl_decoder.safetensors, ...
  loras/        lcm-lora-sdv1-5.safetensors, and LoRAs you train with the plugin
under {models}"""


def _say(msg: str) -> None:
    print(f"[run] {msg}", flush=True)


def server_command(comfy: Path, port: int, headless: bool, extra_yaml: Path, own_host: bool) -> list[str]:
    import torch

    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--extra-model-paths-config", str(extra_yaml)]
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    if own_host:
        cmd += ["--base-directory", str(HOME)]
    if headless:
        cmd += ["--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    return cmd


def find_workflow(name: str) -> Path:
    p = Path(name)
    for cand in (p, ROOT / "workflows" / name, ROOT / "workflows" / f"{name}.json"):
        if cand.is_file():
            return cand
    have = ", ".join(sorted(x.stem for x in (ROOT / "workflows").glob("*.json")))
    raise SystemExit(f"no workflow {name!r}; shipped ones: {have}")


def run_headless(client: ComfyClient, workflow: Path, output_dir: Path, timeout: float) -> list[Path]:
    prompt = to_api(load(workflow), client.get("/object_info"))
    try:
        hist = client.run(prompt, timeout)
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(f"{workflow.name}: {e}") from None
    if hist["status"]["status_str"] != "success":
        errs = [m for m in hist["status"].get("messages", []) if m[0] == "execution_error"]
        detail = errs[0][1] if errs else hist["status"]
        raise SystemExit(f"{workflow.name} failed: {json.dumps(detail, indent=1)[:3000]}")
    paths = []
    for out in hist["outputs"].values():
        for img in out.get("images", []):
            if img.get("type") == "output":
                paths.append(output_dir / img.get("subfolder", "") / img["filename"])
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Start ComfyUI with ComfyUI-ADD, or run a workflow headless.")
    ap.add_argument("--headless", metavar="WORKFLOW", help="run this workflow (name in workflows/ or a path) through the HTTP API, print the images' paths, and exit")
    ap.add_argument("--port", type=int, default=None, help="port (default 8188; headless: a free one)")
    ap.add_argument("--timeout", type=float, default=900, help="headless: seconds to wait for the workflow")
    a = ap.parse_args(argv)

    comfy = host_path()
    own_host = not os.environ.get("COMFYUI_PATH")
    models = (HOME / "models") if own_host else (comfy / "models")
    input_dir = (HOME / "input") if own_host else (comfy / "input")
    output_dir = (HOME / "output") if own_host else (comfy / "output")
    placeholders = HOME / "placeholders"
    wf = find_workflow(a.headless) if a.headless else None
    stood_in = prepare([models, HOME / "models"], placeholders, input_dir, extra=(wf,) if wf else ())
    yaml = extra_paths_yaml(placeholders, HOME / "extra_model_paths.yaml")
    if stood_in:
        _say("NOTE: no real weights for " + ", ".join(stood_in) + ".")
        _say("Tiny random-weight stand-ins are used instead, so every workflow runs, but its images are NOISE.")
        print(REAL_WEIGHTS_HELP.format(models=models), flush=True)

    if a.headless:
        port = a.port or free_port()
        client = ComfyClient(f"http://127.0.0.1:{port}")
        log = HOME / "headless_server.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(server_command(comfy, port, True, yaml, own_host), cwd=comfy, stdout=fh, stderr=subprocess.STDOUT)
            try:
                client.wait_ready(proc, log_tail=lambda: Path(log).read_text(errors="replace")[-3000:])
                _say(f"running {wf.name} (server log: {log})")
                t0 = time.time()
                paths = run_headless(client, wf, output_dir, a.timeout)
            except (SystemExit, WorkflowError, RuntimeError, TimeoutError) as e:
                print(Path(log).read_text(errors="replace")[-3000:], file=sys.stderr)
                raise SystemExit(str(e)) from None
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        _say(f"done in {time.time() - t0:.1f} s; images:")
        for p in paths:
            print(p)
        return 0 if paths else 1

    port = a.port or 8188
    _say(f"starting ComfyUI at http://127.0.0.1:{port}  (workflows: Workflow menu → Browse Templates → comfyui-add)")
    proc = subprocess.Popen(server_command(comfy, port, False, yaml, own_host), cwd=comfy)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
