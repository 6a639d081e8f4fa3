"""Sweeps of the digits proof: named ADD configurations, each trained with several seeds in its own
process, scored along the way with every metric of ``benchmarks/digits.py``'s evaluator.

A configuration is a dict of overrides: fields of :class:`benchmarks.digits.Size` (``add_steps``,
``add_batch``, ``lora_rank``, ``lr_lora``, ``disc_t_hi``, ``data`` ...) and fields of ``ADDConfig``
(``r1_gamma``, ``disc_features``, ``distill_weighting`` ...). Every (configuration, seed) run trains
the LoRA the way ADD Train does (``digits.train_student``), writes it every ``eval_every`` steps and
scores the 1-step student at each of those checkpoints (1, 2 and 4 steps at the last one), against the
validation split (``--reference val``, the default: settings are chosen there, and the test split stays the
proof table's alone; ``--reference test`` scores on the test split instead, into ``<sweep>-test``).

Results: ``out/sweeps/<sweep>/runs/<config>-s<seed>.jsonl`` (one line per evaluated checkpoint),
``out/sweeps/<sweep>.csv`` (every line of every run) and ``out/sweeps/<sweep>.png`` (FD, pixel FD,
precision and recall against training steps, mean over seeds with the spread, one curve per
configuration). A killed sweep resumes: a run continues from its last saved state (the training
node's own resume) and evaluated checkpoints are not evaluated again; finished runs are skipped.

    .venv/bin/python -m benchmarks.sweep_digits --sweep NAME [--configs a,b] [--seeds 0,1] [--jobs 2]
        [--steps N] [--eval-every N] [--device cpu|cuda] [--reference val|test] [--reduced] [--list]

``--list`` prints the named sweeps and their configurations.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "out" / "sweeps"

from benchmarks.sweep_configs import SWEEPS  # noqa: E402  (the named configurations)


def metric_keys() -> tuple[str, ...]:
    return ("fd", "pix_fd", "precision", "recall", "acc", "acc2", "diversity", "speckle", "background")


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """-> (Size fields, ADDConfig fields, train_student keywords) of a configuration's overrides."""
    from benchmarks import digits as D

    size_fields = {f.name for f in dataclasses.fields(D.Size)}
    size, cfg, kw = {}, {}, {}
    for k, v in overrides.items():
        if k == "eval_every":
            continue
        if k in ("data", "distill_weight", "adv_weight"):
            kw[k] = v
        elif k in size_fields:
            size[k] = v
        else:
            cfg[k] = v
    return size, cfg, kw


# --------------------------------------------------------------------------------------------
# one run (a worker process)
# --------------------------------------------------------------------------------------------
def run_one(sweep: str, name: str, overrides: dict[str, Any], seed: int, out: Path, base, device: str = "cpu",
            reference: str = "val") -> None:
    """Train one (configuration, seed), scoring every saved checkpoint against the ``reference`` split
    ('val': the validation split, so that no setting is chosen on the test split the proof reports); resumable."""
    import torch

    from benchmarks import digits as D
    from scripts.comfy_host import import_comfy

    import_comfy()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    size_over, cfg_over, kw = split_overrides(overrides)
    # The teacher, classifier and evaluation seeds stay the base's: only the student run's seed changes.
    size = dataclasses.replace(base, **size_over)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-s{seed}"
    results = run_dir / f"{tag}.jsonl"
    done_steps = set()
    if results.is_file():
        for line in results.read_text().splitlines():
            if line.strip():
                done_steps.add((json.loads(line)["step"], json.loads(line)["sample_steps"]))
    splits = D.load_splits(base)
    held_out = splits.reference(reference)  # before any training: a size without that split fails here
    stamp(out, base, reference)
    clip = D.ClassEmbeddingCLIP(size.context_dim, seed=base.seed)
    teacher_sd, clf_sd = D.teacher_and_classifier(base, splits, clip)
    mp = D.model_patcher(size, teacher_sd)
    ev = D.Evaluator(clf_sd, *held_out, *splits.train)
    classes = D.prompted_classes(size)
    lora = run_dir / f"{tag}.safetensors"
    t0 = time.perf_counter()
    recent: list[dict] = []  # training logs since the last evaluation

    def score(step: int, path: str) -> None:
        # the game since the last checkpoint: does D separate real from fake, who pulls harder on x_hat
        game = {k: (sum(r[k] for r in recent if k in r) / max(1, sum(k in r for r in recent)))
                for k in ("d_real", "d_fake", "grad_adv", "grad_distill")}
        recent.clear()
        counts = (1, 2, 4) if step >= size.add_steps else (1,)
        for n in counts:
            if (step, n) in done_steps:
                continue
            s, _ = D.sample_student(mp, path, clip, size, n, noise_seed=seed)
            m = ev.metrics(s, classes)
            row = {"sweep": sweep, "config": name, "seed": seed, "reference": reference, "step": step, "sample_steps": n,
                   "train_s": round(time.perf_counter() - t0, 1), **{k: m.get(k) for k in metric_keys()},
                   **{k: round(v, 5) for k, v in game.items()}}
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            done_steps.add((step, n))
            print(f"[sweep] {tag} step {step} x{n}: FD {m['fd']:.1f} pixFD {m['pix_fd']:.2f} "
                  f"P {m['precision']:.2f} R {m['recall']:.2f} acc {m['acc']:.2f} speckle {m['speckle']:.3f}",
                  flush=True)

    eval_every = int(overrides.get("eval_every", 0)) or max(1, size.add_steps // 4)
    info = D.train_student(mp, clip, size, str(lora), seed=seed, save_every=eval_every, on_save=score,
                           overrides=cfg_over, device=torch.device(device), log=lambda m: print(m, flush=True),
                           on_progress=recent.append,
                           real=splits.train, **kw)
    # A run resumed after its last save has nothing new to save: score the final file if needed.
    score(size.add_steps, str(lora))
    (run_dir / f"{tag}.done").write_text(json.dumps({"seconds": info["seconds"]}))


def stamp(out: Path, base, reference: str) -> None:
    """Mark ``out`` (a sweep's folder) with the teacher and the split its runs are scored against, or refuse it
    when it holds runs made with another teacher or scored on another split: resuming them would mix figures
    that do not compare (a finished run is skipped, and its rows would show in the tables as current)."""
    from benchmarks import digits as D

    want = {"teacher": base.key(*D.TEACHER_FIELDS), "reference": reference}
    path = out / "stamp.json"
    runs = list((out / "runs").glob("*.jsonl")) if (out / "runs").is_dir() else []
    have = json.loads(path.read_text()) if path.is_file() else ({"teacher": "unknown (made before stamps)",
                                                                  "reference": "unknown"} if runs else None)
    if have is not None and have != want:
        raise ValueError(f"{out} holds runs of teacher {have['teacher']} scored on the {have['reference']} split; this "
                         f"sweep is teacher {want['teacher']} on the {want['reference']} split. Move that folder away "
                         "(or pass another --sweep name or --out) to start these runs afresh.")
    if have is None:  # written once (the parent, before its workers start), atomically: workers only read it
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(want))
        os.replace(tmp, path)


def worker_command(args: argparse.Namespace, name: str, overrides: dict[str, Any], seed: int) -> list[str]:
    """The command line of one (configuration, seed) worker: the parent's sweep, folder, device, split and size."""
    return [sys.executable, "-m", "benchmarks.sweep_digits", "--sweep", args.sweep, "--out", args.out,
            "--device", args.device, "--reference", args.reference, "--worker", name, json.dumps(overrides), str(seed)
            ] + (["--reduced"] if args.reduced else [])


# --------------------------------------------------------------------------------------------
# the sweep (the parent process)
# --------------------------------------------------------------------------------------------
def collect(out: Path) -> list[dict]:
    rows = []
    for p in sorted((out / "runs").glob("*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))  # runs of older versions may lack a column
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def summary(rows: list[dict]) -> dict[tuple[str, int, int], dict[str, tuple[float, float, int]]]:
    """(config, step, sample_steps) -> {metric: (mean, spread = max - min over seeds, seeds)}."""
    import numpy as np

    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["step"], r["sample_steps"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        out[key] = {}
        for m in metric_keys():
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                out[key][m] = (float(np.mean(vals)), float(np.max(vals) - np.min(vals)), len(vals))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary([r for r in rows if r["sample_steps"] == 1])
    configs = sorted({k[0] for k in s})
    panels = ("fd", "pix_fd", "precision", "recall")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, m in zip(axes, panels):
        for c in configs:
            pts = sorted((k[1], v[m]) for k, v in s.items() if k[0] == c and m in v)
            if not pts:
                continue
            steps = [p[0] for p in pts]
            mean = [p[1][0] for p in pts]
            spread = [p[1][1] / 2 for p in pts]
            ax.errorbar(steps, mean, yerr=spread, label=c, marker="o", ms=3, capsize=2)
        ax.set_title({"fd": "classifier FD (1 step)", "pix_fd": "pixel FD (1 step)",
                      "precision": "precision (1 step)", "recall": "recall (1 step)"}[m])
        ax.set_xlabel("student steps")
        if m in ("fd", "pix_fd"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title + " — mean over seeds, bars = spread")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def table(rows: list[dict], sample_steps: int = 1) -> str:
    """Markdown: the last evaluated step of each configuration, mean ± spread over seeds."""
    s = summary([r for r in rows if r["sample_steps"] == sample_steps])
    lines = ["| config | step | seeds | FD | pixel FD | precision | recall | acc | acc2 | diversity | speckle | "
             "background |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (c, step, _), v in sorted(s.items()):
        def f(m, d=2):
            return f"{v[m][0]:.{d}f} ± {v[m][1] / 2:.{d}f}" if m in v else ""
        lines.append(f"| {c} | {step} | {v['fd'][2]} | {f('fd', 1)} | {f('pix_fd')} | {f('precision')} | "
                     f"{f('recall')} | {f('acc')} | {f('acc2')} | {f('diversity')} | {f('speckle', 3)} | "
                     f"{f('background', 3)} |")
    return "\n".join(lines)


def base_size(reduced: bool):
    from benchmarks import digits as D

    return D.REDUCED if reduced else D.FULL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default="length", help="a named sweep (see --list) or a new name with --config")
    ap.add_argument("--configs", default="", help="comma-separated subset of the sweep's configurations")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=JSON overrides, e.g. 'lr=' + '{\"lr_lora\": 3e-4}' (adds to or replaces the sweep's)")
    ap.add_argument("--seeds", default="0,1", help="student seeds (>= 2 for a figure with a spread)")
    ap.add_argument("--jobs", type=int, default=0, help="runs at once (default: 2 on a CPU, 4 on a GPU)")
    ap.add_argument("--steps", type=int, default=0, help="student steps (default: the base size's)")
    ap.add_argument("--eval-every", type=int, default=0, help="score a checkpoint every N steps (default: steps/4)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reduced", action="store_true", help="the reduced sizes (teacher, samples per class)")
    ap.add_argument("--reference", choices=("val", "test"), default="val",
                    help="the held-out digits every run is scored against: 'val' (the validation split, to choose "
                         "settings; default) or 'test' (the proof's split; results go to out/sweeps/<sweep>-test)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", action="store_true", help="only write the CSV, plot and tables of what has run")
    ap.add_argument("--worker", nargs=3, metavar=("NAME", "OVERRIDES_JSON", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    label = args.sweep if args.reference == "val" else f"{args.sweep}-test"  # its folder, CSV and plot
    out = Path(args.out) / label
    if args.list:
        for sw, cfgs in SWEEPS.items():
            print(sw)
            for c, o in cfgs.items():
                print(f"  {c}: {json.dumps(o)}")
        return 0
    if args.worker:
        name, over, seed = args.worker
        run_one(args.sweep, name, json.loads(over), int(seed), out, base_size(args.reduced), args.device, args.reference)
        return 0

    configs = dict(SWEEPS.get(args.sweep, {}))
    if args.configs:
        wanted = args.configs.split(",")
        unknown = [c for c in wanted if c not in configs]
        if unknown:
            ap.error(f"--configs: {unknown} not in sweep {args.sweep!r} ({sorted(configs)})")
        configs = {c: configs[c] for c in wanted}
    for spec in args.config:
        name, _, js = spec.partition("=")
        configs[name] = json.loads(js or "{}")
    if not configs:
        ap.error(f"no configurations: {args.sweep!r} is not a named sweep ({sorted(SWEEPS)}); add --config NAME=JSON")
    for c in configs.values():
        if args.steps:
            c["add_steps"] = args.steps
        if args.eval_every:
            c["eval_every"] = args.eval_every
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = args.jobs or (4 if args.device.startswith("cuda") else 2)
    if not args.report:  # a folder of another teacher or split is refused, even when all its runs are done
        try:
            stamp(out, base_size(args.reduced), args.reference)
        except ValueError as e:
            ap.error(str(e))
    todo = [(c, o, s) for c, o in configs.items() for s in seeds
            if not (out / "runs" / f"{c}-s{s}.done").is_file()] if not args.report else []
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // jobs) if not args.device.startswith("cuda") else 2
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               COMFYUI_ADD_DEVICE=args.device)
    from tqdm import tqdm

    if todo:
        from benchmarks import digits as D

        D.prepare(base_size(args.reduced))
    running: list[tuple[subprocess.Popen, str, Any]] = []
    failed = []
    bar = tqdm(total=len(configs) * len(seeds), initial=len(configs) * len(seeds) - len(todo), unit="run",
               desc=f"sweep {args.sweep}")
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    while todo or running:
        while todo and len(running) < jobs:
            c, o, s = todo.pop(0)
            cmd = worker_command(args, c, o, s)
            log = open(logs / f"{c}-s{s}.log", "a", encoding="utf-8")
            running.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), f"{c}-s{s}",
                            log))
        time.sleep(2)
        for p, tag, log in list(running):
            if p.poll() is not None:
                running.remove((p, tag, log))
                log.close()
                bar.update(1)
                if p.returncode != 0:
                    failed.append(tag)
                    tqdm.write(f"{tag} failed (rc {p.returncode}): see {logs / (tag + '.log')}")
                rows = collect(out)
                write_csv(rows, Path(args.out) / f"{label}.csv")
    bar.close()
    rows = collect(out)
    write_csv(rows, Path(args.out) / f"{label}.csv")
    made = json.loads((out / "stamp.json").read_text()) if (out / "stamp.json").is_file() else None
    print(f"\n{label}: " + (f"teacher {made['teacher']}, scored on the {made['reference']} split" if made else
                            "made before sweep folders were stamped: teacher and split unknown"))
    if rows:
        plot(rows, Path(args.out) / f"{label}.png", f"digits sweep '{args.sweep}', scored on the {args.reference} split")
        for n in (1, 2, 4):
            if any(r["sample_steps"] == n for r in rows):
                print(f"\n{n} step{'s' if n > 1 else ''}:")
                print(table(rows, n))
    print(f"\n{args.out}/{label}.csv, {args.out}/{label}.png" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
