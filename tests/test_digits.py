"""The digits proof, reduced (benchmarks/bench_digits.py at REDUCED sizes): a ComfyUI UNet teacher of
scikit-learn's handwritten digits, distilled through the training node's adapter and ``ADDRun`` into a
LoRA that ComfyUI's loader applies and the ADD sampler samples.

If the adapter got a sigma convention, the x0/eps conversion, the conditioning or the feature hooks
wrong, the student would still "train" (losses move, files are written) while learning nothing: this
test measures what it generates with a frozen digit classifier instead.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow


def test_the_splits_are_disjoint_stratified_and_the_test_split_is_the_earlier_one():
    """The sweeps choose settings on the validation split, the proof reports the test split: the three never
    share a digit, each has every class in its share, and the test split is the 75/25 split earlier proof
    tables were scored on."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from benchmarks import digits as D

    labels = load_digits().target
    splits = D.load_splits(D.FULL)
    idx = splits.index
    assert {k: len(v) for k, v in idx.items()} == {"train": 1797 - 450 - D.FULL.val_digits, "val": D.FULL.val_digits,
                                                    "test": 450}
    assert len(np.unique(np.concatenate(list(idx.values())))) == 1797  # disjoint, and every digit used
    for name, rows in idx.items():
        share = np.bincount(labels[rows], minlength=10) / len(rows)
        assert np.abs(share - np.bincount(labels) / 1797).max() < 0.01, name  # stratified
        x, y = getattr(splits, name)
        assert x.shape == (len(rows), 1, 8, 8) and (y.numpy() == labels[rows]).all()
    _, earlier_test = train_test_split(np.arange(1797), test_size=0.25, random_state=D.FULL.seed, stratify=labels)
    assert (idx["test"] == earlier_test).all()
    assert splits.reference("val")[0] is splits.val[0] and splits.reference("test")[0] is splits.test[0]
    import dataclasses

    none = D.load_splits(dataclasses.replace(D.FULL, val_digits=0))
    assert len(none.index["train"]) == 1797 - 450 and len(none.index["val"]) == 0
    with pytest.raises(ValueError, match="no validation split"):
        none.reference("val")
    with pytest.raises(ValueError, match="'val' or 'test'"):
        splits.reference("train")


def test_add_one_step_beats_the_teachers_one_step_at_its_data_cfg(comfy, tmp_path):
    # ADD = the small_data settings, the noise-paired regression and distribution matching included. At these
    # reduced sizes (100 steps) the ablation rows do not yet separate (benchmarks/README_digits.md: the pairs
    # overtake after ~200 full-size steps); the full proof's goal lines check that ordering.
    from benchmarks import bench_digits
    from benchmarks import digits as D

    result = bench_digits.run(D.REDUCED, tmp_path, rows_wanted={"teacher 1", "teacher 25", "ADD"})
    rows = result["rows"]
    m = bench_digits._mean  # (mean, spread) over seeds -> mean
    print(bench_digits.table(result))
    assert result["test_acc"] > 0.9, "the evaluator itself must recognise the held-out digits"
    # Every row is scored under every metric, each a finite number.
    for name, r in rows.items():
        for k in ("fd", "pix_fd", "precision", "recall", "acc", "acc2", "diversity", "speckle", "background"):
            assert math.isfinite(m(r, k)), (name, k, r)
    # The student learns the distribution of its training data: the teacher's samples at CFG teacher_cfg.
    # Its 1-step baseline is the teacher's 1 step at that CFG.
    t1 = rows[bench_digits.teacher_row(1, D.REDUCED.teacher_cfg)]
    t25 = next(v for k, v in rows.items() if k.startswith("teacher 25 steps"))
    add1 = rows["ADD 1 step"]
    # The teacher learned the digits: many steps with CFG give the prompted class.
    assert m(t25, "acc") > 0.8, t25
    # ADD's 1-step student beats the teacher's own 1 step by a clear margin under both distances, and is
    # recognisable to both classifiers.
    assert m(add1, "fd") < D.REDUCED_MARGIN * m(t1, "fd"), (add1, t1)
    assert m(add1, "pix_fd") < m(t1, "pix_fd"), (add1, t1)
    assert m(add1, "acc") > 0.7 and m(add1, "acc2") > 0.7, add1
    assert add1["evals"] == 1 and t25["evals"] == 50
    # Every row's samples are written for other metrics.
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == sorted(
        n.replace(" ", "_").replace(".", "") + ".npz" for n in rows)


def test_the_pool_pairs_are_the_noise_each_teacher_sample_started_from(comfy):
    """The noise-paired regression trains the 1-step student on (noise, x0) pairs of the cached teacher pool;
    the noise is replayed from the pool's generator. Re-sampling a class from the replayed noise with the
    training data's own sampler gives the cached samples exactly: the pairs are right."""
    import torch

    from benchmarks import digits as D
    from scripts.comfy_host import plugin_module

    size = D.REDUCED
    clip = D.ClassEmbeddingCLIP(size.context_dim, seed=size.seed)
    teacher_sd, _ = D.teacher_and_classifier(size, D.load_splits(size), clip)
    mp = D.model_patcher(size, teacher_sd)
    x_pool, y_pool = D.teacher_pool(mp, clip, size)
    noise = D.pool_noise(size)
    assert noise.shape == x_pool.shape
    adapter, tr_data = plugin_module("adapters.model"), plugin_module("training.data")
    network = adapter.frozen_copy(mp, torch.device("cpu"))
    schedule = plugin_module("training.schedule").DiscreteSchedule(adapter.schedule_sigmas(mp))
    c, n = 7, size.pool_per_class
    rows = slice(c * n, (c + 1) * n)
    eps = noise[rows]
    g = torch.Generator().manual_seed(size.seed + 4242)
    for _ in range(c):  # the pool draws one noise block per class, in class order
        torch.randn((n, 1, 8, 8), generator=g)
    ctx = clip.context[c : c + 1].expand(n, -1, -1)
    unc = clip.context[D.CLASSES : D.CLASSES + 1].expand(n, -1, -1)
    x0, drawn = tr_data.teacher_sample(lambda xx, s, cd: adapter.comfy_denoise(network, xx, s, cd), (n, 1, 8, 8),
                                       schedule, g, size.data_steps, cond={"context": ctx}, uncond={"context": unc},
                                       cfg_scale=size.teacher_cfg, return_noise=True)
    assert torch.equal(drawn, eps)
    assert torch.equal(x0, x_pool[rows]) and bool((y_pool[rows] == c).all())


def test_the_noise_report_splits_pixel_fd_and_finds_the_background_noise_the_clamp_turns_into_brightness():
    """benchmarks/digits_noise.py: its two terms add up to the evaluator's Frechet distance, and a background
    that is right on average but noisy reads brighter after the clamp (the noise below -1 is cut)."""
    import numpy as np

    from benchmarks import digits as D
    from benchmarks.digits_noise import NoiseReport, pixel_fd_terms

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(0.3, 1.5, size=(300, 6))
    mean_term, cov_term = pixel_fd_terms(a, b)
    assert mean_term + cov_term == pytest.approx(D.frechet_distance(a, b), rel=1e-6)
    assert mean_term == pytest.approx(((a.mean(0) - b.mean(0)) ** 2).sum())

    report = NoiseReport()
    x_test = D.load_splits(D.FULL).test[0].numpy()
    clean = report.measure(x_test)
    assert clean["pix_fd"] == pytest.approx(0.0, abs=1e-6)
    noisy_x = x_test + rng.normal(0.0, 0.3, size=x_test.shape)
    noisy = report.measure(noisy_x)
    assert noisy["bg_raw_mean"] == pytest.approx(clean["bg_raw_mean"], abs=0.02)  # unbiased before the clamp
    assert noisy["bg_raw_spread"] > 0.25 > clean["bg_raw_spread"]
    # clamped: half of N(0, 0.3) is cut at -1, the other half adds 0.3 * E|z| / 2 ~ 0.12 on average
    assert noisy["bg_clamped_mean"] - clean["bg_clamped_mean"] == pytest.approx(0.3 * math.sqrt(2 / math.pi) / 2,
                                                                               abs=0.03)
    assert noisy["mean_term"] > 10 * clean["mean_term"] + 0.05 and noisy["outside_pca"] > clean["outside_pca"]


def test_a_sweep_run_is_scored_on_the_validation_split_unless_told_the_test_split(comfy, tmp_path, monkeypatch,
                                                                                    capsys):
    """The sweeps choose settings, so they score against the validation split; the same run (same seed, so
    the same samples) scored with ``reference='test'`` gets other figures, and each row says its split."""
    import dataclasses

    import torch

    from benchmarks import digits as D
    from benchmarks import sweep_digits

    tiny = dataclasses.replace(D.REDUCED, name="sweep-test", teacher_iters=30, clf_epochs=2, pool_per_class=8,
                               per_class=6, add_steps=2, add_batch=4)
    splits = D.load_splits(tiny)
    seen = []

    class Spy(D.Evaluator):  # which digits each run's evaluator compares with
        def __init__(self, clf_state, x_ref, *args, **kwargs):
            seen.append(x_ref)
            super().__init__(clf_state, x_ref, *args, **kwargs)

    monkeypatch.setattr(D, "Evaluator", Spy)
    rows = {}
    for reference, split in (("val", splits.val), ("test", splits.test)):
        out = tmp_path / reference
        sweep_digits.run_one("t", "c", {}, 0, out, tiny, reference=reference)
        assert torch.equal(seen[-1], split[0])
        rows[reference] = [json.loads(line) for line in (out / "runs" / "c-s0.jsonl").read_text().splitlines()]
        assert (out / "runs" / "c-s0.done").is_file()
    assert [(r["step"], r["sample_steps"]) for r in rows["val"]] == [(r["step"], r["sample_steps"]) for r in rows["test"]]
    assert {r["reference"] for r in rows["val"]} == {"val"} and {r["reference"] for r in rows["test"]} == {"test"}
    # the same samples (speckle is a property of the samples alone) against other digits (FD, precision, recall)
    for v, t in zip(rows["val"], rows["test"]):
        assert v["speckle"] == t["speckle"]
        assert v["fd"] != t["fd"]
    with pytest.raises(ValueError, match="no validation split"):
        sweep_digits.run_one("t", "c", {}, 0, tmp_path / "none", dataclasses.replace(tiny, val_digits=0))
    # A folder of runs scored on one split (or made with another teacher) is not resumed as another's.
    with pytest.raises(ValueError, match="scored on the val split"):
        sweep_digits.run_one("t", "c", {}, 0, tmp_path / "val", tiny, reference="test")
    with pytest.raises(ValueError, match="holds runs of teacher"):
        sweep_digits.run_one("t", "c", {}, 0, tmp_path / "val", dataclasses.replace(tiny, teacher_iters=29))
    # ... and the command refuses it too, even when every run in it is done (nothing left to train): its
    # rows would otherwise be reported as this teacher's (here the command's teacher is FULL's, not tiny's)
    with pytest.raises(SystemExit):
        sweep_digits.main(["--sweep", "val", "--config", "c={}", "--seeds", "0", "--out", str(tmp_path)])
    assert "holds runs of teacher" in capsys.readouterr().err
    # The parent hands its split to every worker it starts.
    args = sweep_digits.argparse.Namespace(sweep="t", out=str(tmp_path), device="cpu", reference="test", reduced=True)
    cmd = sweep_digits.worker_command(args, "c", {}, 0)
    assert cmd[cmd.index("--reference") + 1] == "test" and "--reduced" in cmd


def test_seeds_in_parallel_share_one_teacher_made_before_they_start(comfy, tmp_path):
    """``bench_digits --jobs 2``: the teacher, classifier and pool are made once, on every core, before the seed
    processes start; each seed then loads them from the cache instead of training its own copy."""
    import dataclasses

    from benchmarks import bench_digits
    from benchmarks import digits as D

    sets = {"teacher_iters": 31, "clf_epochs": 2, "pool_per_class": 8, "per_class": 6,
            "add_steps": 2, "add_batch": 4}
    size = dataclasses.replace(D.REDUCED, **sets)
    for name, key in (("teacher", size.key(*D.TEACHER_FIELDS)), ("classifier", size.key(*D.CLASSIFIER_FIELDS)),
                      ("pool", D.pool_key(size))):
        (D.CACHE / f"{name}-{key}.safetensors").unlink(missing_ok=True)  # made by this run
    result = bench_digits.run_parallel(size, tmp_path, (0, 1), 2, [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    for seed in (0, 1):
        log = (tmp_path / f"seed-{seed}" / "log.txt").read_text()
        assert "teacher: cached" in log and "classifier: cached" in log and "pool: cached" in log, log[-2000:]
        assert "trained in" not in log
    assert len(result["per_seed"]["ADD 1 step"]) == 2  # both seeds scored
    with pytest.raises(ValueError, match="would rebuild another size"):  # a size the workers cannot rebuild
        bench_digits.run_parallel(dataclasses.replace(size, lora_rank=3), tmp_path, (0, 1), 2,
                                  [f"{k}={json.dumps(v)}" for k, v in sets.items()])
