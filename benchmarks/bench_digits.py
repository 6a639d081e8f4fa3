"""ADD on real images: a small ComfyUI UNet teacher of handwritten digits distilled into a 1-step
LoRA student through the training node's code path (see ``benchmarks/digits.py`` for what is real).

Rows (``per_class`` samples of each of the 10 class prompts, the same seeds in every row):

* teacher 1 and 4 steps without CFG (one evaluation a step, like the student) and with CFG
  (``teacher_cfg``), and 25 steps with CFG (the target): ComfyUI's KSampler path (euler, "normal");
* ADD 1 / 2 / 4 steps: the LoRA trained by ``ADDRun`` on teacher-generated data from the class
  prompts (ADD Train's default), applied with ComfyUI's LoRA loader, sampled with the ADD sampler;
* ablations at 1 and 2 steps: distillation only (``adv_weight`` 0), adversarial only (``distill_weight``
  0), pairs only (both 0), and ADD without pairs (the paper's two terms: regression at lambda 2.5, also at
  4 steps).

Metrics from classifiers trained on the train split (frozen), against the held-out test split
(``digits.Evaluator``: FD, pixel FD, precision, recall, accuracy by two classifiers, diversity, speckle,
background); the sweeps that chose the settings score on the validation split instead. Every row's samples go to
``out/digits/<row>.npz`` (``samples`` (N, 1, 8, 8) in [-1, 1], ``classes`` (N,)) and a picture grid
(rows x classes) to ``out/digits/grid.png``. The trained teacher and classifier are cached in
``.cache/digits/`` (delete it to retrain them).

    .venv/bin/python -m benchmarks.bench_digits [--reduced] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import digits as D  # noqa: E402

# Issue goals, checked under every metric the evaluator reports (a change counts only if it holds under each).
DISTANCES = ("fd", "pix_fd")  # lower is better
QUALITIES = ("precision", "recall", "acc", "acc2")  # higher is better


def run(size: D.Size, out_dir: Path, log=D._log, rows_wanted: set[str] | None = None,
        seeds: tuple[int, ...] = (0,), device: str = "cpu", cache: bool = True) -> dict:
    """Trains (or loads) the teacher and classifier, trains the students, samples and scores every
    row, once per seed (the student runs' seeds and every row's sampling noise; the teacher and the
    evaluator stay fixed). -> {'rows': {name: {metric: (mean, spread) or value, 'evals', 'train_s'}},
    'test_acc', 'seconds', 'teacher_s', 'samples': {name: tensor of the first seed}}.
    ``device``: where the teacher and the students train (sampling goes through ComfyUI's own device);
    ``cache`` False trains the teacher and classifier even when ``.cache/digits`` has them."""
    from scripts.comfy_host import import_comfy

    import_comfy()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # the benchmark prints its own progress
    t_start = time.perf_counter()
    splits = D.load_splits(size)
    clip = D.ClassEmbeddingCLIP(size.context_dim, seed=size.seed)
    t_teacher = time.perf_counter()
    teacher_sd, clf_sd = D.teacher_and_classifier(size, splits, clip, log, device=device, cache=cache)
    mp = D.model_patcher(size, teacher_sd)
    if rows_wanted is None or rows_wanted - {"teacher 1", "teacher 4", "teacher 25"}:
        D.teacher_pool(mp, clip, size, log)  # the students' training data, made (or loaded) inside the timed block
    teacher_s = time.perf_counter() - t_teacher
    ev = D.Evaluator(clf_sd, *splits.test, *splits.train)
    log(f"classifier: {ev.ref_acc:.1%} on the test split; second classifier {ev.ref_acc2:.1%}")
    classes = D.prompted_classes(size)
    per_seed: dict[str, list[dict]] = {}
    samples: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}

    def score(name: str, s: torch.Tensor, evals: int, seed: int, train_s: float | None = None) -> None:
        m = ev.metrics(s, classes)
        per_seed.setdefault(name, []).append(m)
        meta[name] = {"evals": evals, "train_s": train_s}
        samples.setdefault(name, s)
        log(f"{name} (seed {seed}): FD {m['fd']:.2f}, pixel FD {m['pix_fd']:.2f}, P {m['precision']:.2f}, "
            f"R {m['recall']:.2f}, acc {m['acc']:.1%}, div {m['diversity']:.2f}, speckle {m['speckle']:.3f}")

    want = (lambda n: rows_wanted is None or n in rows_wanted)
    teacher_rows = [(1, 1.0), (1, size.teacher_cfg), (4, 1.0), (4, size.teacher_cfg), (25, size.teacher_cfg)]
    # ADD = the small_data preset: the adversarial term, distribution matching as the distillation term
    # (size.distill_loss, size.distill_weight) and the noise-paired regression (size.paired_weight); the
    # ablations remove one of ADD's terms and keep the pairs; the last two rows are the pairs alone and the
    # paper's two terms alone (its distillation regression at lambda 2.5, no pairs; README_digits.md: the study)
    runs = [("ADD", dict(data="teacher"), (1, 2, 4)),
            ("distillation only", dict(data="teacher", adv_weight=0.0), (1, 2)),
            ("adversarial only", dict(data="teacher", distill_weight=0.0), (1, 2)),
            ("pairs only", dict(data="teacher", adv_weight=0.0, distill_weight=0.0), (1, 2)),
            ("ADD without pairs", dict(data="teacher", distill_weight=2.5,
                                       overrides={"paired_weight": 0.0, "distill_loss": "regression"}), (1, 2, 4))]
    with tempfile.TemporaryDirectory(prefix="add-digits-") as tmp:
        for seed in seeds:
            for steps, cfg in teacher_rows:
                if want(f"teacher {steps}"):
                    s, n = D.sample_teacher(mp, clip, size, steps, cfg, noise_seed=seed)
                    score(teacher_row(steps, cfg), s, n, seed)
            for label, kwargs, step_counts in runs:
                if not want(label):
                    continue
                log(f"training: {label}, seed {seed} ({size.add_steps} steps, batch {size.add_batch})")
                lora = os.path.join(tmp, f"{label.replace(' ', '_')}-{seed}.safetensors")
                info = D.train_student(mp, clip, size, lora, log=log, seed=size.seed + seed, device=device, **kwargs)
                for steps in step_counts:
                    s, n = D.sample_student(mp, lora, clip, size, steps, noise_seed=seed)
                    score(f"{label} {steps} step{'s' if steps > 1 else ''}", s, n, seed, info["seconds"])
    rows = {name: {**aggregate(ms), **meta[name]} for name, ms in per_seed.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, s in samples.items():
        np.savez_compressed(out_dir / (name.replace(" ", "_").replace(".", "") + ".npz"),
                            samples=s.numpy().astype(np.float32), classes=classes.numpy())
    return {"rows": rows, "samples": samples, "test_acc": ev.ref_acc, "seeds": tuple(seeds),
            "per_seed": per_seed, "meta": meta, "seconds": time.perf_counter() - t_start, "teacher_s": teacher_s}


def run_parallel(size: D.Size, out_dir: Path, seeds: tuple[int, ...], jobs: int, sets: list[str] = ()) -> dict:
    """:func:`run` once per seed in ``jobs`` processes at a time (one thread each), merged as one result.
    ``sets``: the ``FIELD=JSON`` changes that make ``size`` from FULL (or REDUCED), which each worker applies."""
    import dataclasses
    import json
    import subprocess

    t_start = time.perf_counter()
    base = D.REDUCED if size.name == "reduced" else D.FULL
    rebuilt = dataclasses.replace(base, **{k: json.loads(v) for k, _, v in (a.partition("=") for a in sets)})
    if rebuilt != size:  # each worker rebuilds its size from --reduced and --set, as main() does
        raise ValueError(f"run_parallel: the workers would rebuild another size from {list(sets)} than {size}; "
                         "pass every field that differs from FULL (or REDUCED) in sets")
    D.prepare(size)  # once, on every core: not once per worker
    prepare_s = time.perf_counter() - t_start
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs, pending = [], list(seeds)
    parts = {s: out_dir / f"seed-{s}" for s in seeds}
    while pending or procs:
        while pending and len(procs) < jobs:
            s = pending.pop(0)
            cmd = [sys.executable, "-m", "benchmarks.bench_digits", "--seeds", str(s), "--out", str(parts[s]),
                   "--json", str(parts[s] / "result.json")] + (["--reduced"] if size.name == "reduced" else [])
            cmd += [x for a in sets for x in ("--set", a)]
            parts[s].mkdir(parents=True, exist_ok=True)
            log = open(parts[s] / "log.txt", "w", encoding="utf-8")
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), s, log))
        time.sleep(2)
        for p, s, log in list(procs):
            if p.poll() is not None:
                procs.remove((p, s, log))
                log.close()
                if p.returncode:
                    raise RuntimeError(f"seed {s} failed (rc {p.returncode}): see {parts[s] / 'log.txt'}")
    per_seed: dict[str, list] = {}
    meta, test_acc, teacher_s = {}, None, prepare_s
    for s in seeds:
        r = json.loads((parts[s] / "result.json").read_text())
        for name, ms in r["per_seed"].items():
            per_seed.setdefault(name, []).extend(ms)
        meta.update(r["meta"])
        test_acc = r["test_acc"]
    samples = {}
    for name in per_seed:
        f = parts[seeds[0]] / (name.replace(" ", "_").replace(".", "") + ".npz")
        samples[name] = torch.from_numpy(np.load(f)["samples"])
    rows = {name: {**aggregate(ms), **meta[name]} for name, ms in per_seed.items()}
    return {"rows": rows, "samples": samples, "test_acc": test_acc, "seeds": seeds, "per_seed": per_seed,
            "meta": meta, "seconds": time.perf_counter() - t_start, "teacher_s": teacher_s}


def aggregate(ms: list[dict]) -> dict:
    """[{metric: value} per seed] -> {metric: (mean, max - min)}."""
    return {k: (float(np.mean([m[k] for m in ms])), float(np.ptp([m[k] for m in ms]))) for k in ms[0]}


def teacher_row(steps: int, cfg: float) -> str:
    return f"teacher {steps} step{'s' if steps > 1 else ''}" + (f", cfg {cfg:g}" if cfg != 1.0 else "")


def _find(rows: dict, prefix: str) -> dict:
    return next(v for k, v in rows.items() if k.startswith(prefix))


def _mean(r: dict, m: str) -> float:
    v = r[m]
    return v[0] if isinstance(v, tuple) else v


def goals(rows: dict) -> list[tuple[str, bool, str]]:
    """(goal, met, detail) for every goal, each distance checked separately."""
    t1, t25 = rows["teacher 1 step"], _find(rows, "teacher 25 steps")
    a1 = rows["ADD 1 step"]
    out = []
    for m in DISTANCES:
        out.append((f"ADD 1 step {m} <= 2x teacher 25-step CFG", _mean(a1, m) <= 2 * _mean(t25, m),
                    f"{_mean(a1, m):.2f} vs 2 x {_mean(t25, m):.2f}"))
        out.append((f"ADD 1 step {m} <= 0.5x teacher 1 step (cfg 1)", _mean(a1, m) <= 0.5 * _mean(t1, m),
                    f"{_mean(a1, m):.2f} vs 0.5 x {_mean(t1, m):.2f}"))
    out.append(("ADD 1 step accuracy >= 95 %", _mean(a1, "acc") >= 0.95, f"{_mean(a1, 'acc'):.1%}"))
    out.append(("ADD 1 step second-classifier accuracy >= 95 % of the 25-step target's",
                _mean(a1, "acc2") >= 0.95 * _mean(t25, "acc2"), f"{_mean(a1, 'acc2'):.1%} vs {_mean(t25, 'acc2'):.1%}"))
    out.append(("ADD 1 step diversity within 0.8-1.2", 0.8 <= _mean(a1, "diversity") <= 1.2,
                f"{_mean(a1, 'diversity'):.2f}"))
    for n in ("1 step", "2 steps"):
        add = rows.get(f"ADD {n}")
        for other in ("distillation only", "adversarial only", "pairs only", "ADD without pairs"):
            abl = f"{other} {n}"
            if add is None or abl not in rows:
                continue
            worse = [m for m in DISTANCES if _mean(rows[abl], m) <= _mean(add, m)]
            worse += [m for m in ("precision", "recall", "acc") if _mean(rows[abl], m) > _mean(add, m)]
            out.append((f"ADD {n} beats {abl} under every metric", not worse,
                        "holds under FD, pixel FD, precision, recall, accuracy" if not worse
                        else f"not under {', '.join(worse)}"))
    return out


COLUMNS = (("fd", "FD", 2), ("pix_fd", "pixel FD", 2), ("precision", "precision", 2), ("recall", "recall", 2),
           ("acc", "accuracy", 3), ("acc2", "acc (2nd clf)", 3), ("diversity", "diversity", 2),
           ("speckle", "speckle", 3), ("background", "background", 3))


def _fmt(v, d: int) -> str:
    if isinstance(v, tuple):  # (mean, spread) over seeds
        return f"{v[0]:.{d}f} ± {v[1] / 2:.{d}f}" if v[1] > 0 else f"{v[0]:.{d}f}"
    return f"{v:.{d}f}"


def table(result: dict) -> str:
    rows = result["rows"]
    t1, t25 = rows["teacher 1 step"], _find(rows, "teacher 25 steps")
    lines = ["| row | " + " | ".join(c[1] for c in COLUMNS) + " | FD ÷ teacher 25 | FD ÷ teacher 1 | UNet evals/img "
             "| training |", "|---|" + "---:|" * (len(COLUMNS) + 4)]
    for name, r in rows.items():
        train = f"{r['train_s']:.0f} s" if r.get("train_s") is not None else ""
        cells = " | ".join(_fmt(r[m], d) if m in r else "" for m, _, d in COLUMNS)
        lines.append(f"| {name} | {cells} | {_mean(r, 'fd') / _mean(t25, 'fd'):.2f} | "
                     f"{_mean(r, 'fd') / _mean(t1, 'fd'):.2f} | {r['evals']} | {train} |")
    return "\n".join(lines)


def grid_png(result: dict, path: Path, per_row: int = 2, scale: int = 4) -> None:
    """Rows x classes picture: ``per_row`` samples of every class per row, upscaled, row labels left."""
    from PIL import Image, ImageDraw

    samples = result["samples"]
    names = list(samples)
    n_per = next(iter(samples.values())).shape[0] // D.CLASSES
    cell, label_w = 8 * scale + 2, 190
    w = label_w + D.CLASSES * per_row * cell
    h = (len(names) + 1) * cell
    img = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(img)
    for c in range(D.CLASSES):
        draw.text((label_w + c * per_row * cell + cell // 2, 8), str(c), fill=0)
    for r, name in enumerate(names):
        y0 = (r + 1) * cell
        draw.text((4, y0 + cell // 3), name, fill=0)
        for c in range(D.CLASSES):
            for j in range(per_row):
                s = samples[name][c * n_per + j, 0].clamp(-1, 1)
                # ink dark on white, like the digits on paper
                pix = ((1 - (s + 1) / 2) * 255).round().to(torch.uint8).numpy()
                tile = Image.fromarray(pix, "L").resize((8 * scale, 8 * scale), Image.NEAREST)
                img.paste(tile, (label_w + (c * per_row + j) * cell + 1, y0 + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reduced", action="store_true", help="the test suite's smaller sizes (a few minutes)")
    ap.add_argument("--out", default=str(ROOT / "out" / "digits"), help="folder for the .npz files and grid.png")
    ap.add_argument("--seeds", default="0,1", help="student / sampling seeds; every figure is their mean ± half spread")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once (one thread each)")
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)  # a seed's raw metrics, for --jobs
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="change a field of the size, e.g. --set adv_grad_balance=1 (the teacher's fields keep the cache)")
    args = ap.parse_args(argv)
    t_main = time.perf_counter()
    size = D.REDUCED if args.reduced else D.FULL
    if args.set:
        import dataclasses
        import json

        changes = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args.set)}
        size = dataclasses.replace(size, **changes)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    if args.jobs > 1 and len(seeds) > 1:
        result = run_parallel(size, Path(args.out), seeds, args.jobs, args.set)
    else:
        result = run(size, Path(args.out), seeds=seeds)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({k: result[k] for k in ("per_seed", "meta", "test_acc", "seconds",
                                                                      "teacher_s")}))
        return 0
    print()
    print(f"digits, {size.name} sizes: teacher {size.teacher_iters} iterations, ADD {size.add_steps} steps at batch "
          f"{size.add_batch}, {size.per_class} samples per class per row; classifier {result['test_acc']:.1%} on the "
          f"test split; threads {torch.get_num_threads()}")
    print(table(result))
    print()
    for goal, ok, detail in goals(result["rows"]):
        print(f"{'met ' if ok else 'MISSED'} {goal}: {detail}")
    grid_png(result, Path(args.out) / "grid.png")
    print(f"\nsamples: {args.out}/*.npz, grid: {args.out}/grid.png; total {(time.perf_counter() - t_main) / 60:.1f} min "
          f"(of which {result['teacher_s'] / 60:.1f} min making or loading the teacher, classifier and pool)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
