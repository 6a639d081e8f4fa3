"""Where the pixel FD of a digits row comes from: its samples' pixel noise, measured before the clamp.

Reads the ``.npz`` files the proof writes (``out/digits/seed-*/<row>.npz``) and prints, per row, mean over
the seeds found:

* the pixel FD split into its two terms: the squared distance of the means and the covariance term
  (the evaluator's pixel features: the first 32 principal components of the train split's pixels);
* the raw brightness of the background pixels (dark in > 90 % of real digits), before the clamp to
  [-1, 1]: its mean and its spread over the samples; then its mean after the clamp (what the picture and
  every metric see). A row whose background is right on average but noisy reads brighter once clamped:
  the noise below -1 is cut, the noise above it stays;
* the spread of what lies outside those 32 components (fine pixel detail and noise).

    .venv/bin/python -m benchmarks.digits_noise [--dir out/digits] [--row "ADD 1 step" --row "ADD 2 steps"]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import digits as D  # noqa: E402

DEFAULT_ROWS = ("teacher 1 step", "teacher 25 steps, cfg 2", "ADD 1 step", "ADD 2 steps", "ADD 4 steps",
                "pairs only 1 step", "ADD without pairs 1 step")


def file_name(row: str) -> str:
    """The bench's file name for a row (bench_digits writes ``row`` with spaces as _ and no dots)."""
    return row.replace(" ", "_").replace(".", "") + ".npz"


def pixel_fd_terms(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean term, covariance term) of the Frechet distance between Gaussians fitted to ``a`` and ``b``."""
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum()), float(np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class NoiseReport:
    """The measures above, against the test split of ``size``'s splits (the proof's)."""

    def __init__(self, size: D.Size = D.FULL, pca_dims: int = 32) -> None:
        splits = D.load_splits(size)
        x_train, x_test = splits.train[0], splits.test[0]
        train = self._flat(x_train.numpy(), clamp=True)
        self.mean = train.mean(0)
        _, _, vt = np.linalg.svd(train - self.mean, full_matrices=False)
        self.basis = vt[:pca_dims].T
        self.dark = (train < -0.9).mean(0) > 0.9
        self.test_feats = self._feats(self._flat(x_test.numpy(), clamp=True))

    @staticmethod
    def _flat(x: np.ndarray, clamp: bool) -> np.ndarray:
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        return np.clip(x, -1.0, 1.0) if clamp else x

    def _feats(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.basis

    def measure(self, samples: np.ndarray) -> dict[str, float]:
        raw, clamped = self._flat(samples, clamp=False), self._flat(samples, clamp=True)
        mean_term, cov_term = pixel_fd_terms(self._feats(clamped), self.test_feats)
        centred = clamped - self.mean
        outside = centred - centred @ self.basis @ self.basis.T
        return {"pix_fd": mean_term + cov_term, "mean_term": mean_term, "cov_term": cov_term,
                "bg_raw_mean": float(raw[:, self.dark].mean()), "bg_raw_spread": float(raw[:, self.dark].std()),
                "bg_clamped_mean": float(clamped[:, self.dark].mean()), "outside_pca": float(outside.std())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(ROOT / "out" / "digits"), help="the proof's output folder (seed-*/ inside)")
    ap.add_argument("--row", action="append", default=[], help="a row to report, as the bench names it (repeat "
                    f"the option for more; default: {'; '.join(DEFAULT_ROWS)})")
    args = ap.parse_args(argv)
    folders = sorted(Path(args.dir).glob("seed-*")) or [Path(args.dir)]
    rows = args.row or list(DEFAULT_ROWS)
    report = NoiseReport()
    keys = ("pix_fd", "mean_term", "cov_term", "bg_raw_mean", "bg_raw_spread", "bg_clamped_mean", "outside_pca")
    print("| row | seeds | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    test = report.measure(D.load_splits(D.FULL).test[0].numpy())
    print("| test split | - | " + " | ".join(f"{test[k]:.3f}" for k in keys) + " |")
    missing = []
    for row in rows:
        files = [f / file_name(row) for f in folders if (f / file_name(row)).exists()]
        if not files:
            missing.append(row)
            continue
        per_seed = [report.measure(np.load(f)["samples"]) for f in files]
        print(f"| {row} | {len(files)} | " + " | ".join(f"{np.mean([m[k] for m in per_seed]):.3f}" for k in keys) + " |")
    if missing:
        print(f"no samples in {args.dir} for: {', '.join(missing)} (run benchmarks.bench_digits first)", file=sys.stderr)
    return 0 if len(missing) < len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
