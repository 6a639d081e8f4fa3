"""The GPU suite's dry run (benchmarks/gpu_suite.py --dry-run): every part's code at tiny sizes on the CPU,
so a short GPU slot is never lost to a typo.

What is checked is what a GPU run must deliver: the JSON and the markdown hold every row of the catalogue,
each measured (or saying why not), marked dry run rather than passed off as a figure; and the fast path's
output equals the eager output through the same wrapper and runner code the GPU uses.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.slow


def _suite(tmp_path: Path, *args: str, timeout: float = 600) -> tuple[dict, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run", "--out", str(tmp_path), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (js,) = tmp_path.glob("*-cpu-dry-run.json")
    (md,) = tmp_path.glob("*-cpu-dry-run.md")
    return json.loads(js.read_text()), md.read_text(), seconds


def test_dry_run_writes_every_row_marked_dry_run(tmp_path):
    from benchmarks import gpu_suite as G

    data, md, seconds = _suite(tmp_path)
    print(f"dry run took {seconds:.0f} s")
    log = next(tmp_path.glob("*.log")).read_text()
    assert data["dry_run"] is True and data["schema"] == G.SCHEMA
    assert data["device"]["name"] == "CPU (dry run)" and data["device"]["torch"]
    failed = {p: st for p, st in data["parts"].items() if st["status"] != "done"}
    assert not failed, (failed, log[-4000:])

    want = [r.id for r in G.catalogue(G.DRY)]
    got = {r["id"]: r for r in data["rows"]}
    assert list(got) == want  # every row, in the catalogue's order
    for rid, r in got.items():
        res = r.get("result")
        assert res is not None, f"{rid} has no result"
        if res.get("skipped"):  # only the multi-GPU rows may be skipped on a CPU
            assert rid.startswith("distributed/") and "2 or more GPUs" in res["skipped"], (rid, res)
            assert r["verdict"].startswith("not measured")
            continue
        assert r["dry_run"] is True and r["verdict"] == "dry run", (rid, r["verdict"])
        figures = [res.get("value"), res.get("ratio")]
        assert any(isinstance(v, (int, float)) for v in figures), (rid, res)
        assert all(v is None or v == v for v in figures), (rid, res)  # no NaN

    # the markdown: the dry-run banner, a line per row, no met/MISSED verdict anywhere
    assert "DRY RUN" in md
    for r in data["rows"]:
        assert f"| {G.cell(r['label'])} |" in md, r["label"]
    assert "MISSED" not in md and "| met |" not in md
    assert md.count("| dry run |") == sum(1 for r in data["rows"] if not r["result"].get("skipped"))

    # the fast path ran (not a model handed back unchanged) and kept the eager output exactly
    assert got["streams/exact/cuda_graph"]["result"]["value"] == 0.0
    assert got["compile/exact/torch_compile"]["result"]["value"] == 0.0
    for rid in ("streams/1/per_frame+cuda_graph", "streams/2/stream_x4+cuda_graph", "compile/2/stream_x1+torch_compile"):
        note = got[rid]["result"]["note"]
        assert " 0 eager" in note and not note.startswith("0 fast"), (rid, note)
    # model calls per frame: n for per-frame sampling, fewer for the stream batch (3-frame clip + flush)
    assert got["streams/2/per_frame"]["result"]["note"].startswith("2.00 model calls a frame")
    assert got["streams/2/stream_x1"]["result"]["note"].startswith("1.33 model calls a frame")


def test_a_part_past_its_cap_is_stopped_and_the_rest_still_run(tmp_path):
    data, md, _ = _suite(tmp_path, "--parts", "sampler,distributed", "--cap", "sampler=1")
    assert data["parts"]["sampler"]["status"] == "timeout", data["parts"]
    assert data["parts"]["distributed"]["status"] == "done", data["parts"]
    rows = {r["id"]: r for r in data["rows"]}
    sampler = [r["verdict"] for rid, r in rows.items() if rid.startswith("sampler/")]
    # rows measured before the stop are kept; the rest say why they are missing
    assert all(v == "dry run" or v == "not measured (stopped at its cap of 1 s)" for v in sampler), sampler
    assert sampler[-1] == "not measured (stopped at its cap of 1 s)", sampler
    assert rows["streams/1/per_frame"]["verdict"] == "not measured (not run)"  # not asked for, still listed
    assert "not measured (stopped at its cap of 1 s)" in md
