"""Sharded training reads: the image bytes each worker reads, at N and 5N rows.

    .venv/bin/python benchmarks/train_data.py               # N=512 and 2,560 rows, minutes
    .venv/bin/python benchmarks/train_data.py --smoke-test  # N=64 and 320

Fixture samples (32 px PNGs) written as a generation run writes them (OutputStore: parts
of 256 rows, row groups of 64) train the tiny LLaVA preset for one epoch on 2 Ray Train
workers with ``deterministic_order: true`` (global batch 16, micro-batch 8, no
checkpoints, no export). Each worker counts the compressed bytes of the image column
chunks of the row groups it reads (raypipe/train/shards.py); ``image_bytes_total`` is
the same figure over every row group of the data (one epoch reads each once).

- max_worker_share = image_bytes_max_worker / image_bytes_total (1/W would be perfect;
  the data held by every worker is 1.0);
- samples_per_s: the loop's own (steps 2.. of the epoch), both workers together.

The last line printed is one JSON object: the 5N run's figures, and both runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import common  # the checkout and tests/ (fixture_data) on sys.path


def one(n: int, work: Path) -> dict:
    from fixture_data import write_fixture_run

    from raypipe.train.config import load_train_config
    from raypipe.train.trainer import fit

    out = work / f"data-{n}"
    write_fixture_run(str(out), n, seed=0, image_size=32)
    cfg = load_train_config(
        str(common.ROOT / "raypipe" / "configs" / "train" / "tiny.yaml"),
        ["num_workers=2", "global_batch_size=16", "micro_batch_size=8", "epochs=1",
         "export=false", "checkpoint_every_steps=null", f"report_every={10**6}",
         "data.deterministic_order=true", "log_every=1000"],
    )  # fmt: skip
    t = time.time()
    result = fit(cfg, [str(out)], work / f"train-{n}")
    wall = time.time() - t
    total = result.image_bytes_epoch
    worst = max(result.image_bytes_by_rank)
    return {
        "workers": 2,
        "rows": n,
        "steps": result.steps,
        "image_bytes_total": total,
        "image_bytes_by_rank": result.image_bytes_by_rank,
        "image_bytes_max_worker": worst,
        "max_worker_share": round(worst / total, 4),
        "samples_per_s": round(result.samples_per_s, 2) if result.samples_per_s else None,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="rows of the small run (large: 5N)")
    ap.add_argument("--smoke-test", action="store_true", help="N=64")
    args = ap.parse_args()
    common.bench_env()
    import ray

    n = 64 if args.smoke_test else args.n
    work = Path(tempfile.mkdtemp(prefix="rp-train-data-"))
    os.environ.setdefault("RAYPIPE_TINY_DIR", str(work / "tiny"))
    common.start_ray(2)
    try:
        small = one(n, work)
        large = one(5 * n, work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    common.emit({**large, "small": small, "large": large})


if __name__ == "__main__":
    main()
