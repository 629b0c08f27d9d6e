"""Benchmark: calibration selection from a 1,000,000-row x 50-column parquet pool (streamed).

Generates the pool (48 float32 features, 2 slice columns) once, then, in a fresh process per run,
selects 1,000 rows (stratified, random, diversity) with the drift check against a 100,000-row
reference sample of the same file, and reports wall time and peak resident memory.

    .venv/bin/python bench/bench_calibration.py [--rows 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_pool(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    writer = None
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        cols = {f"f{i:02d}": rng.normal(i % 7, 1 + i % 3, n).astype(np.float32) for i in range(48)}
        cols["region"] = rng.choice(["north", "south", "east", "west", "central"], n, p=[.3, .3, .2, .15, .05])
        cols["segment"] = rng.choice(["a", "b", "c", "d"], n, p=[.4, .3, .2, .1])
        table = pa.table(cols)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=chunk)
    writer.close()


def one_run(pool: str, strategy: str, out: str) -> None:
    from qops.calibration import select_calibration
    from qops.spec import CalibrationSpec, DiversitySpec, DriftSpec

    features = [f"f{i:02d}" for i in range(48)]
    t0 = time.perf_counter()
    spec = CalibrationSpec(size=1000, strategy=strategy, seed=0, drift=DriftSpec(on_drift="warn"),
                           diversity=DiversitySpec(candidates=10) if strategy == "diversity" else None)
    res = select_calibration(spec, pool=pool, reference=pool, output_dir=out, features=features,
                             slice_columns=["region", "segment"])
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"strategy": strategy, "seconds": round(wall, 1), "peak_rss_mb": round(peak_mb),
                      "rows": res.rows, "drift_passed": res.drift_passed, "pool_rows": res.pool_rows}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--workdir")
    ap.add_argument("--run", nargs=3, metavar=("POOL", "STRATEGY", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        one_run(*args.run)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qops-bench-cal-"))
    pool = work / f"pool_{args.rows}.parquet"
    if not pool.exists():
        t0 = time.perf_counter()
        make_pool(pool, args.rows)
        print(f"generated {pool} ({pool.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr)
    for strategy in ("stratified", "random", "diversity"):
        subprocess.run([sys.executable, __file__, "--run", str(pool), strategy, str(work / strategy)], check=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})


if __name__ == "__main__":
    main()
