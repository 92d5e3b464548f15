"""Our loader (pipeline.data) as a benchmark peer, measured exactly like annbatch and tiledbsoma-ml.

Runs in the project's venv. Each subcommand prints one JSON line; benchmarks/loader.py drives both.

    .venv/bin/python benchmarks/peers/ours_peer.py build SRC.h5ad OUT_DIR [--shard-size N]
    .venv/bin/python benchmarks/peers/ours_peer.py run OUT_DIR --batch-size 4096 [--num-workers N] [--segment-rows R]

``build`` runs the ``hvae-pipeline shard SRC --out OUT_DIR --shard-size N --seed 0`` command in this
process (the same Typer app the console script calls), so its time excludes interpreter start-up
like the peers' builds. ``run`` iterates ``ShardedDataset(OUT_DIR).loader(batch_size, seed, epoch)``
and scores mixing with ``obs_column("donor_id")[batch["obs_index"]]``. Batches are CSRBatch
(torch tensors), never densified.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _common import emit, measure, peer_parser, rss_now_mb, run_command  # noqa: E402


def build(args: argparse.Namespace) -> None:
    import pipeline.data  # noqa: F401  (the command imports it lazily: import first, like the peers' builds)
    from pipeline.cli import app

    argv = ["shard", args.source, "--out", args.out, "--seed", str(args.seed)]
    if args.shard_size is not None:
        argv += ["--shard-size", str(args.shard_size)]
    if args.compression is not None:
        argv += ["--compression", args.compression]
    start = time.perf_counter()
    app(argv, standalone_mode=False)
    build_s = time.perf_counter() - start
    shards = pipeline.data.read_manifest(args.out)["shards"]
    emit(
        {
            "tool": "ours",
            "step": "build",
            "build_s": round(build_s, 2),
            "command": "hvae-pipeline " + " ".join(argv),
            "n_shards": len(shards),
            "max_shard_cells": max(int(s["n_obs"]) for s in shards),
        }
    )


def run(args: argparse.Namespace) -> None:
    import numpy as np
    from pipeline.data import ShardedDataset

    baseline = rss_now_mb()
    start = time.perf_counter()
    ds = ShardedDataset(args.store)
    n_obs, n_vars = ds.n_obs, ds.n_vars
    _, donor_codes = np.unique(np.asarray(ds.obs_column("donor_id")), return_inverse=True)
    setup_s = time.perf_counter() - start
    extra = {} if args.num_workers is None else {"num_workers": args.num_workers}
    if args.segment_rows is not None:
        extra["segment_rows"] = args.segment_rows

    def make_iter(epoch: int):
        for batch in ds.loader(batch_size=args.batch_size, seed=args.seed, epoch=epoch, **extra):
            counts = batch["counts"]
            assert counts.shape[1] == n_vars, counts.shape
            rows = int(counts.shape[0])
            yield rows, int(counts.indptr[-1]), donor_codes[batch["obs_index"].numpy()]

    result = measure(make_iter, args.batch_size, args.warmup, args.max_batches)
    emit(
        {
            "tool": "ours",
            "step": "run",
            "n_obs": n_obs,
            "n_vars": n_vars,
            "rss_baseline_mb": round(baseline, 1),
            "setup_s": round(setup_s, 3),
            "batch_type": "pipeline.data CSRBatch (torch tensors)",
            "params": {"batch_size": args.batch_size, "seed": args.seed, **extra},
            **result,
        }
    )


def main() -> None:
    parser, b, r = peer_parser(__doc__.splitlines()[0])
    b.add_argument("--shard-size", type=int, default=None, help="cells per shard (default: the CLI's)")
    b.add_argument("--compression", default=None, help="lz4, zstd or none (default: the CLI's)")
    b.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-workers", type=int, default=None, help="default: the loader's")
    r.add_argument("--segment-rows", type=int, default=None, help="rows permuted together in the window (1: every row)")
    run_command(parser, build, run)


if __name__ == "__main__":
    main()
