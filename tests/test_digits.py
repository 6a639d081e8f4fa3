"""The digits proof, reduced (benchmarks/bench_digits.py at REDUCED sizes): a ComfyUI UNet teacher of
scikit-learn's handwritten digits, distilled through the training node's adapter and ``ADDRun`` into a
LoRA that ComfyUI's loader applies and the ADD sampler samples.

If the adapter got a sigma convention, the x0/eps conversion, the conditioning or the feature hooks
wrong, the student would still "train" (losses move, files are written) while learning nothing: this
test measures what it generates with a frozen digit classifier instead.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow


def test_add_one_step_beats_the_teachers_one_step_and_distillation_alone_does_not(comfy, tmp_path):
    from benchmarks import bench_digits
    from benchmarks import digits as D

    result = bench_digits.run(D.REDUCED, tmp_path, rows_wanted={"teacher 1", "teacher 25", "ADD", "distillation only"})
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
    add1, dist1 = rows["ADD 1 step"], rows["distillation only 1 step"]
    # The teacher learned the digits: many steps with CFG give the prompted class.
    assert m(t25, "acc") > 0.8, t25
    # ADD's 1-step student beats the teacher's own 1 step by a clear margin under both distances, and is
    # recognisable to both classifiers.
    assert m(add1, "fd") < D.REDUCED_MARGIN * m(t1, "fd"), (add1, t1)
    assert m(add1, "pix_fd") < m(t1, "pix_fd"), (add1, t1)
    assert m(add1, "acc") > 0.7 and m(add1, "acc2") > 0.7, add1
    # Distillation alone does not get there (the paper's ablation ordering).
    assert m(dist1, "fd") > m(add1, "fd"), (dist1, add1)
    assert add1["evals"] == 1 and t25["evals"] == 50
    # Every row's samples are written for other metrics.
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == sorted(
        n.replace(" ", "_").replace(".", "") + ".npz" for n in rows)
