"""The trainer's cost, each measure in a subprocess of its own so that its peak RSS is its own
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``): ``python -m bench.trainer_cost MEASURE ROWS``.

* ``fit``: ``trainer.fit.fit_model`` with a fixed K=8, n_init=10 (what a retrain costs);
* ``auto``: the same, choosing K over 2..12;
* ``minibatch``: ``MiniBatchKMeans`` vs ``KMeans``, both k-means++ with n_init=10 (mini-batches
  of 4096) on the same rows: fit seconds of each and the inertia of each on all rows.

The rows: 8 features, 8 overlapping Gaussian blobs (``make_blobs``, cluster_std 2.5 on centres
in a +/-10 box): harder than the demo's well separated segments, as real customers are.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np


def rows(n: int, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import make_blobs

    x, _ = make_blobs(n_samples=n, n_features=8, centers=8, cluster_std=2.5, center_box=(-10, 10),
                      random_state=seed)
    return np.asarray(x, dtype=np.float64)


def peak_rss_mb() -> float:
    """This process's peak resident set. ``getrusage``'s ``ru_maxrss`` would do, but Linux carries
    it over ``fork`` + ``exec`` from the parent (here the benchmark, 800 MB by then), so the
    kernel's per-address-space high-water mark (``VmHWM``, reset by ``exec``) is read instead."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux


def measure(kind: str, n: int) -> dict[str, Any]:
    from trainer.fit import KConfig, fit_model

    x = rows(n)
    base_rss = peak_rss_mb()
    started = time.perf_counter()
    if kind == "fit":
        fit, _ = fit_model(x, KConfig(8, 2, 12, 10, 42, 5000))
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(),
                "rss_before_fit_mb": base_rss, "k": fit.k}
    if kind == "auto":
        fit, fits = fit_model(x, KConfig(None, 2, 12, 10, 42, 5000))
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb(), "k": fit.k,
                "tried": [f.k for f in fits]}
    if kind == "minibatch":
        from sklearn.cluster import KMeans, MiniBatchKMeans

        full = KMeans(n_clusters=8, n_init=10, random_state=42).fit(x)
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        mini = MiniBatchKMeans(n_clusters=8, n_init=10, batch_size=4096, random_state=42).fit(x)
        mini_s = time.perf_counter() - started
        full_inertia = float(-full.score(x))
        mini_inertia = float(-mini.score(x))
        return {"kmeans_s": full_s, "minibatch_s": mini_s, "speedup": full_s / mini_s,
                "inertia_gap": mini_inertia / full_inertia - 1.0, "peak_rss_mb": peak_rss_mb()}
    raise SystemExit(f"unknown measure {kind}")


def in_subprocess(kind: str, n: int, timeout_s: float = 600) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "bench.trainer_cost", kind, str(n)],
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
