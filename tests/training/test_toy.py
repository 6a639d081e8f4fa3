"""The paper's ordering at toy scale (ADD Table 1 in spirit): the full loss beats the teacher's own
1-step sample by >= 2x, distillation alone does not learn to sample, and the full loss is not worse
than adversarial-only. The paper's own gap there is tiny (FID 20.6 vs 20.8, Table 1); on the toy at
this budget the two tie within a few percent, so that comparison carries a 10% tolerance."""

from __future__ import annotations

from training_helpers import single_thread  # noqa: F401  (repo root on sys.path; autouse fixture)
from comfyui_add.training.toy import run_suite


def test_toy_ordering_full_beats_teacher_one_step_and_ablations():
    r = run_suite(teacher_steps=1500, steps=200, batch=64, samples=2000)
    msg = {k: round(v.swd, 4) for k, v in r.items()}
    assert r["teacher_50"].swd < 0.5 * r["teacher_1"].swd, msg  # the teacher itself is a working sampler
    assert r["add"].swd <= 0.5 * r["teacher_1"].swd, msg
    assert r["add"].swd < 1.1 * r["adv_only"].swd, msg
    assert r["distill_only"].swd > r["add"].swd, msg
