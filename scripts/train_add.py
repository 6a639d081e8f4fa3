"""Headless ADD training: the ADD Train node's run from a config file, on one process or many (torchrun).

    python scripts/train_add.py my_run.toml                                  # one GPU (or the CPU)
    torchrun --nproc_per_node 8 scripts/train_add.py my_run.toml             # 8 GPUs, data parallel
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 scripts/train_add.py my_run.toml

The config (TOML or JSON) holds the run's files and data (RUN_KEYS below) and any ADDConfig field
(training/config.py) at the top level. The checkpoint is loaded with ComfyUI's own loader; the run
is described as a ``training.setup.RunRequest`` and assembled by ``adapters/run_setup.py`` (the ADD
Train node's own path), and trained by ``training.run.ADDRun``, so it
writes the same ``<output>.safetensors`` LoRA and ``<output>.add-state/`` folder as the node: a
run started here resumes in the node and the other way round (same model, same settings). Running
the same command again resumes the run. Also written into the state folder: ``train_log.jsonl``
(the losses of every step) and ``samples/step_XXXXXXXX.png`` (a grid of 1-step student samples
every ``preview_every`` steps). ``training_mode = "full"`` fine-tunes every weight (fp32 copy,
``lr_full``) and writes the same kind of LoRA file, extracted at rank ``lora_rank`` from
student - teacher; the reconstruction error is printed at each save and stored in the file.

Data parallel: every rank trains on its own data streams (training/distributed.py); global batch =
``batch_size * data_streams`` (default one stream per rank). Rank 0 alone writes files.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: ComfyUI's root must win for its top-level ``nodes``

from scripts.plugin_package import load as _load_package  # noqa: E402

_load_package()  # the plugin's core/, training/ and adapters/ as the package 'comfyui_add', imported once
from comfyui_add.core.errors import ADDError  # noqa: E402  (pure Python: no torch, no ComfyUI)

# key -> (default, what it is); everything else in a config must be an ADDConfig field
RUN_KEYS: dict[str, tuple[object, str]] = {
    "model": (None, "checkpoint file to distil (.safetensors; SD1.x/2.x/SDXL and their distilled variants), loaded "
                    "with ComfyUI's loader"),
    "output": (None, "the LoRA to write, e.g. loras/my_turbo_lora.safetensors; its state goes beside it"),
    "prompts": ([], "list of prompts (or one string, a prompt per line): the teacher makes the training images"),
    "image_folder": ("", "folder of images with same-name .txt captions: the training images instead of the teacher's, "
                         "or (images_for 'discriminator') what the discriminator learns as real"),
    "width": (512, "training width in pixels (multiple of 8)"),
    "height": (512, "training height in pixels (multiple of 8)"),
    "data_cfg": (7.0, "CFG scale of the teacher when it generates training images"),
    "data_steps": (25, "teacher sampling steps per generated training image"),
    "gradient_checkpointing": (False, "recompute activations in the backward pass (less memory, slower)"),
    "dinov2_file": ("", "DINOv2 ViT-S/14 .safetensors for discriminator = 'dinov2'"),
    "data_streams": (0, "global data streams per step (0 = keep the saved count, else one per rank)"),
    "device": ("auto", "'auto' (cuda:LOCAL_RANK when CUDA is there, else cpu), 'cuda' or 'cpu'"),
    "dist_timeout_s": (1800, "seconds a rank waits for the others in a collective before giving up"),
    "preset": ("none", "a named set of ADDConfig values, as ADD Train's preset input: none | paper | small_data; "
                       "the ADDConfig keys written in this file win over it"),
}


# names other trainers use for our keys (for the "did you mean" hint)
_ALIASES = {"learning_rate": "lr_lora", "lr": "lr_lora", "unet_lr": "lr_lora", "steps": "max_steps",
            "max_train_steps": "max_steps", "rank": "lora_rank", "network_dim": "lora_rank",
            "network_alpha": "lora_alpha", "train_batch_size": "batch_size", "resolution": "width",
            "checkpoint": "model", "pretrained_model": "model", "output_name": "output"}


class ConfigError(ADDError):
    """The config file is unusable; the message names the file and the key."""


# --------------------------------------------------------------------------------------------
# config: read and validate everything before ComfyUI is imported or a process group formed
# --------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict:
    """The config file as a dict (TOML by default, JSON for .json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a .toml or .json file.")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            import tomllib

            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table/object of keys, not {type(data).__name__}.")
    return data


def check_config(data: dict, source: str = "config") -> dict:
    """Validate a config dict -> settings (run keys with defaults + ``train``: the ADDConfig fields given).

    Raises ConfigError naming the key (unknown keys get a suggestion) or the missing file."""
    import dataclasses

    from comfyui_add.core.files import check_name
    from comfyui_add.training.config import ADDConfig
    from comfyui_add.training.setup import RunRequest, parse_prompts

    fields = {f.name for f in dataclasses.fields(ADDConfig)} - {"num_train_timesteps"}
    known = set(RUN_KEYS) | fields
    for key in data:
        if key not in known:
            close = ([_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(key, sorted(known), n=1))
            raise ConfigError(f"{source}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f". Known keys: run keys {sorted(RUN_KEYS)}, and the ADDConfig fields "
                              f"{sorted(fields)}.")
    out = {k: data.get(k, default) for k, (default, _) in RUN_KEYS.items()}
    train = {k: v for k, v in data.items() if k in fields}
    for key in ("model", "output"):
        if not isinstance(out[key], str) or not out[key].strip():
            raise ConfigError(f"{source}: {key!r} is required ({RUN_KEYS[key][1]}).")
    model = os.path.abspath(os.path.expanduser(out["model"]))
    if not os.path.isfile(model):
        raise ConfigError(f"{source}: model file {model!r} does not exist: set 'model' to the checkpoint to distil.")
    out["model"] = model
    out["model_header"] = check_model_file(model, source)
    raw_output = os.path.expanduser(out["output"])
    if raw_output.endswith(("/", os.sep)) or os.path.isdir(raw_output):
        raise ConfigError(f"{source}: output {out['output']!r} is a folder; give the LoRA's file name in it, e.g. "
                          f"{os.path.join(raw_output.rstrip('/' + os.sep) or '.', 'my_turbo_lora.safetensors')!r}.")
    output = os.path.abspath(raw_output)
    if not output.endswith(".safetensors"):
        output += ".safetensors"
    if not os.path.isdir(os.path.dirname(output)):
        raise ConfigError(f"{source}: the folder of output {output!r} does not exist; create it first.")
    try:
        check_name(os.path.basename(output), f"{source}: output file name", ".safetensors", suffixes=(".add-state",),
                   folder=os.path.dirname(output))
    except ADDError as exc:
        raise ConfigError(str(exc)) from None
    out["output"] = output
    prompts = out["prompts"]
    if not (isinstance(prompts, str) or (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts))):
        raise ConfigError(f"{source}: 'prompts' must be a list of strings (or one string, a prompt per line).")
    out["prompts"] = parse_prompts(prompts)
    folder = str(out["image_folder"] or "").strip()
    if "\0" in folder:
        raise ConfigError(f"{source}: image_folder {folder!r} contains a NUL character: give the folder's path.")
    if folder:
        folder = os.path.abspath(os.path.expanduser(folder))
        if not os.path.isdir(folder):
            raise ConfigError(f"{source}: image_folder {folder!r} does not exist.")
    out["image_folder"] = folder
    for key, kind in (("data_cfg", (int, float)), ("data_steps", int), ("data_streams", int),
                      ("dist_timeout_s", (int, float)), ("gradient_checkpointing", bool)):
        if not isinstance(out[key], kind) or (kind is not bool and isinstance(out[key], bool)):
            raise ConfigError(f"{source}: {key} {out[key]!r} has the wrong type ({RUN_KEYS[key][1]}).")
    if out["data_streams"] < 0 or out["dist_timeout_s"] <= 0:
        raise ConfigError(f"{source}: data_streams must be >= 0, dist_timeout_s > 0.")
    if out["device"] not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"{source}: device {out['device']!r}: use 'auto', 'cuda' or 'cpu'.")
    dino = None
    if train.get("discriminator") == "dinov2":
        dino = os.path.abspath(os.path.expanduser(str(out["dinov2_file"] or "")))
        if not out["dinov2_file"] or not os.path.isfile(dino):
            raise ConfigError(f"{source}: discriminator 'dinov2' needs dinov2_file, an existing DINOv2 ViT-S/14 "
                              f".safetensors file (got {out['dinov2_file']!r}).")
    # The ADD Train node's rules (training/setup.py), with the schedule length of SD-class models
    # (checked again with the model's own once it is loaded).
    request = RunRequest(lora_path=output, prompts=tuple(out["prompts"]), width=out["width"], height=out["height"],
                         data_cfg=out["data_cfg"], data_steps=out["data_steps"],
                         gradient_checkpointing=out["gradient_checkpointing"], train=train, preset=str(out["preset"]),
                         explicit=frozenset(train), dinov2_path=dino, where=f"{source}: ")
    try:
        request.check(has_images=bool(folder))
        request.config(images=bool(folder))
    except ADDError as exc:
        raise ConfigError(str(exc)) from None
    out["request"] = request
    out["source"] = source
    return out


UNET_PREFIX = "model.diffusion_model."


def check_model_file(path: str, source: str = "config") -> dict:
    """The checkpoint's safetensors header, read by the plugin's checked reader (whole file, not a
    pickle, valid header), and holding a UNet; ConfigError naming the file otherwise."""
    from comfyui_add.core.files import safetensors_header

    label = f"{source}: model file {path}"
    try:
        header = safetensors_header(path, label, "Set 'model' to an intact .safetensors checkpoint (download or copy it "
                                    "again).")
    except ADDError as exc:
        raise ConfigError(str(exc)) from None
    if not any(k.startswith(UNET_PREFIX) for k in header):
        raise ConfigError(f"{label} holds no UNet weights ({UNET_PREFIX}* tensors): it is not an SD1.x/SD2.x/SDXL "
                          "checkpoint (a LoRA, VAE or text encoder alone?). Set 'model' to a full checkpoint.")
    return header


def check_memory_estimate(settings: dict, device_kind: str, free: int) -> None:
    """ConfigError with the numbers when the run would not fit ``free`` bytes (the node's estimate, from the
    checkpoint's header: no weights are loaded)."""
    from comfyui_add.core.files import DTYPE_SIZES
    from comfyui_add.training.inputs import estimate_memory, memory_error

    header, cfg = settings["model_header"], settings["request"].config()
    shapes = []
    for key, info in header.items():
        if key.startswith(UNET_PREFIX) and isinstance(info, dict) and info.get("shape"):
            size = DTYPE_SIZES.get(info["dtype"], 4)
            shapes.append((tuple(info["shape"]), 4 if device_kind == "cpu" else size))  # CPU computes in fp32
    first = header.get(UNET_PREFIX + "input_blocks.0.0.weight", {}).get("shape") or [320]
    need = estimate_memory(shapes, int(first[0]), cfg.batch_size, (settings["height"] // 8, settings["width"] // 8),
                           cfg.lora_rank, bool(settings["gradient_checkpointing"]), cfg.training_mode,
                           cfg.ema_decay is not None, paired=cfg.paired_passes, dmd=cfg.distill_loss == "dmd")
    if need["total"] > free:
        raise ConfigError(str(memory_error(need, free, device_kind, where=f"{settings['source']}: ",
                                           training_mode=cfg.training_mode)))


def free_bytes(device_kind: str, index: int = 0) -> int:
    """Free memory of the training device: CUDA's free memory, or the host's available RAM."""
    import torch

    if device_kind == "cuda":
        return int(torch.cuda.mem_get_info(index)[0])
    import psutil

    return int(psutil.virtual_memory().available)


# --------------------------------------------------------------------------------------------
# outputs of rank 0: terminal progress, loss log, sample grids
# --------------------------------------------------------------------------------------------
def _log_path(state_dir: str) -> str:
    return os.path.join(state_dir, "train_log.jsonl")


def trim_log(state_dir: str, start_step: int, atomic_write_bytes) -> None:
    """Drop log lines past the resumed step (a killed run may have logged steps it never saved)."""
    path = _log_path(state_dir)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
    atomic_write_bytes("".join(lines).encode("utf-8"), path)


class _Stopped(SystemExit):
    pass


def _say(dist, text: str) -> None:
    print(f"[rank {dist.rank}/{dist.world_size}] {text}", file=sys.stderr, flush=True)


def _last_saved(existing_run, lora_path: str) -> str:
    prev = existing_run(lora_path)
    if prev is None or prev["config"] is None:
        return "no checkpoint was saved yet"
    return f"the last checkpoint (step {prev['step']}, in {os.path.dirname(lora_path)}) is intact"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="TOML or JSON file: the model, the data, the output and ADDConfig fields")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)
    try:
        settings = check_config(read_config(args.config), source=f"config {args.config!r}")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from comfyui_add.core.errors import TrainingFailed
    from comfyui_add.training.distributed import from_env

    dist = from_env()
    want = settings["device"]
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            print("error: device 'cuda' was asked for but torch sees no CUDA device.", file=sys.stderr)
            return 2
        device = torch.device("cuda", dist.local_rank)
    else:
        device = torch.device("cpu")
    try:
        check_memory_estimate(settings, device.type, free_bytes(device.type, device.index or 0))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"config {args.config!r} is valid.")
        return 0
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before ComfyUI is imported: its model management uses the current device

    from scripts.comfy_host import import_comfy

    import_comfy(load_plugin=False, cpu=device.type == "cpu")  # ComfyUI's loader and model management only
    try:
        return _train(settings, dist, device)
    except TrainingFailed as exc:  # the run ended without a usable LoRA
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except ADDError as exc:  # refused before training: the input is named
        print(f"error: config {args.config!r}: {exc}", file=sys.stderr)
        return 2


def _train(settings: dict, dist, device) -> int:
    """Load the model, assemble the run as the node does (adapters/run_setup.py), train; -> exit code."""
    from comfyui_add.adapters import run_setup
    from comfyui_add.training import distributed
    from comfyui_add.training.checkpoint import atomic_write_bytes
    from comfyui_add.training.resume import check_start, existing_run
    from comfyui_add.training.run import ADDRun

    request, lora_path, main_rank = settings["request"], settings["output"], dist.is_main
    model, clip, vae = run_setup.load_checkpoint(settings["model"], "model file")
    images, captions = None, None
    if settings["image_folder"]:
        images, captions = run_setup.read_image_folder(settings["image_folder"], settings["width"], settings["height"],
                                                       label=f"image_folder {settings['image_folder']!r}")
    plan = run_setup.plan_run(model, request, int(images.shape[0]) if images is not None else None)
    cfg = plan.cfg
    # conflicts, foreign files and unreadable state fail on every rank
    start_step = check_start(lora_path, cfg, plan.fingerprint, plan.run_info)
    if start_step >= cfg.max_steps:
        if main_rank:
            _say(dist, f"{os.path.basename(lora_path)} is already trained to step {start_step}; raise max_steps to "
                       "train further.")
        return 0

    distributed.init_process_group(dist, device, settings["dist_timeout_s"])
    spec, decode_preview = run_setup.build_run_spec(model, clip, vae, request, plan, lora_path, device=device,
                                                    images=images, folder_captions=captions)
    run = ADDRun(spec, dist=dist, data_streams=settings["data_streams"] or None)

    def on_term(signum, _frame):
        raise _Stopped(128 + signum)
    previous_handler = signal.signal(signal.SIGTERM, on_term)

    try:
        start_step = run.build()
        state_dir = run.state_dir
        streams = run.trainer.data_streams
        if main_rank:
            for note in (run.resume_note, run.stream_note):
                if note:
                    _say(dist, "note: " + note)
            trim_log(state_dir, start_step, atomic_write_bytes)
            _say(dist, f"{'resuming at step ' + str(start_step) if start_step else 'starting'}: {plan.family}, "
                       f"{dist.world_size} rank(s) on {device.type}, {streams} data stream(s) x batch {cfg.batch_size} "
                       f"= global batch {streams * cfg.batch_size}; training_mode {cfg.training_mode}; LoRA -> {lora_path}")
        hooks = _hooks(run, dist, cfg, decode_preview, vae, model, state_dir, start_step) if main_rank else None
        result = run.train(hooks=hooks)
    except _Stopped as exc:
        _say(dist, f"stopped by the launcher (another rank failed or the run was interrupted); "
                   f"{_last_saved(existing_run, lora_path)}. Run the same command again to resume.")
        return exc.code
    except (RuntimeError, TimeoutError) as exc:
        if not dist.active or not _is_comm_error(exc):
            raise
        _say(dist, f"training stopped: another rank died or lost its connection ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:200]}); {_last_saved(existing_run, lora_path)}. Run the same "
                   "command again to resume.")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if main_rank:
        _say(dist, f"done: {os.path.basename(lora_path)} trained to step {result.step}.")
    distributed.destroy_process_group()
    return 0


def _is_comm_error(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "peer", "timed out", "socket", "broken pipe"))


def _hooks(run, dist, cfg, decode_preview, vae, model, state_dir: str, start_step: int):
    """Rank 0's callbacks: tqdm progress, one JSON line of losses per step, sample grids."""
    import torch
    from tqdm import tqdm

    from comfyui_add.core.files import atomic_write_bytes
    from comfyui_add.core.images import png_bytes
    from comfyui_add.training.run import RunHooks

    bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
    global_batch = run.trainer.data_streams * cfg.batch_size
    log = open(_log_path(state_dir), "a", encoding="utf-8")
    samples = os.path.join(state_dir, "samples")

    def progress(stats: dict) -> None:
        logs = {k: float(v) for k, v in stats["logs"].items() if isinstance(v, (int, float))}
        ips = stats["it_s"] * global_batch if stats["it_s"] else None
        logs.pop("step", None)
        log.write(json.dumps({"step": int(stats["step"]), "time": round(time.time(), 3), "images_per_s": ips,
                              "ranks": dist.world_size, "global_batch": global_batch, **logs}) + "\n")
        log.flush()
        bar.n = stats["step"]
        bar.set_postfix({k: f"{logs[k]:.3g}" for k in ("d_loss", "g_loss", "distill") if k in logs}
                        | ({"img/s": f"{ips:.3g}"} if ips else {}), refresh=False)
        bar.refresh()

    def preview(step: int, lat) -> None:
        try:  # the checkpoint's own VAE; the node's cheap preview when it cannot decode here
            with torch.no_grad():
                img = vae.decode(model.model.process_latent_out(lat.detach().float().cpu()))
            img = img.reshape(-1, *img.shape[-3:]).float()
        except (RuntimeError, ValueError):
            img = decode_preview(lat)
        os.makedirs(samples, exist_ok=True)
        atomic_write_bytes(png_bytes(img, columns=4), os.path.join(samples, f"step_{step:08d}.png"))

    def saved(step: int, path: str) -> None:
        bar.write(f"step {step}: saved {os.path.basename(path)} and the resumable state")
        if run.export_report is not None:  # training_mode 'full': the LoRA is extracted from the full student
            bar.write(f"step {step}: exported the full fine-tune as a {run.export_report.summary()}")

    return RunHooks(progress=progress, preview=preview if run.spec.preview_shape else None, saved=saved)


if __name__ == "__main__":
    sys.exit(main())
