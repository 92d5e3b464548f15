"""`shard` on Ray workers: cells/s with 1 and 2 workers (and the one-process path) on the same
source, the ratio against the goal (2 workers >= 1.6x 1 worker), the CPU seconds of each run
(driver and workers) and how many cores it kept busy, and peak RSS per worker.

    .venv/bin/python benchmarks/shard_scaling.py                       # 2M cells x 2,000 genes
    .venv/bin/python benchmarks/shard_scaling.py --n-cells 200000 --workers 1 2 4

The source is a synthetic atlas written once as an h5ad (`hvae-pipeline simulate`); each run is
`hvae-pipeline shard SOURCE --workers N` in a fresh process (a local Ray cluster of N CPUs, its
start included in the time: what a user waits for). Every run's shards are checked identical to
the first's (count checksum and per-shard nnz). Peak RSS per worker: the largest resident set of
any Ray worker process, sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.6


def sample_workers(stop: threading.Event, out: dict) -> None:
    """While ``stop`` is unset, every 0.2 s: the largest resident set (MB) of any Ray worker
    process, and each worker's CPU seconds (user + system, from /proc/PID/stat), the last value
    seen per process: a worker's CPU is not counted in its driver's rusage."""
    peak, cpu = 0.0, {}
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.is_set():
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    line = handle.read().replace(b"\0", b" ").decode(errors="replace")
                if line.startswith("ray::") or "default_worker.py" in line:
                    with open(f"/proc/{pid}/status") as handle:
                        rss = next(int(l.split()[1]) for l in handle if l.startswith("VmRSS"))
                    with open(f"/proc/{pid}/stat") as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                    peak = max(peak, rss / 1024)
                    cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, StopIteration, ValueError, IndexError):
                continue
        stop.wait(0.2)
    out["peak_mb"], out["worker_cpu_s"] = peak, sum(cpu.values())


def run(source: Path, out: Path, workers: int, shard_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sampled: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_workers, args=(stop, sampled), daemon=True)
    sampler.start()
    started = time.perf_counter()
    before = os.times()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "shard",
            str(source),
            "--out",
            str(out),
            "--shard-size",
            str(shard_size),
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in {**os.environ, "TQDM_DISABLE": "1"}.items() if k != "RAY_ADDRESS"},
        cwd=ROOT,
    )
    seconds = time.perf_counter() - started
    after = os.times()
    stop.set()
    sampler.join()
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "workers": workers,
        "seconds": round(seconds, 1),
        "cells_per_s": round(manifest["n_obs"] / seconds),
        "peak_worker_rss_mb": round(sampled.get("peak_mb", 0.0)),
        # The command's own CPU (driver, Ray's processes that it waited for) and its workers'.
        "cpu_s": round(
            after.children_user
            - before.children_user
            + after.children_system
            - before.children_system
            + sampled.get("worker_cpu_s", 0.0),
            1,
        ),
        "checksum": manifest["count_checksum"],
        "nnz": [s["nnz"] for s in manifest["shards"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=2_000_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0: the one-process path")
    parser.add_argument("--shard-size", type=int, default=65_536)
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hvae-shard-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source = work / "atlas.h5ad"
        if not source.exists():
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pipeline",
                    "simulate",
                    str(source),
                    "--n-cells",
                    str(args.n_cells),
                    "--n-genes",
                    str(args.n_genes),
                ],
                check=True,
                capture_output=True,
                cwd=ROOT,
            )
            print(
                f"source: {args.n_cells:,} cells x {args.n_genes:,} genes simulated in {time.perf_counter() - t:.0f} s"
            )
        rows = [run(source, work / f"shards_{w}", w, args.shard_size) for w in args.workers]
        for row in rows[1:]:
            assert row["checksum"] == rows[0]["checksum"] and row["nnz"] == rows[0]["nnz"], "shards differ between runs"
        print(
            f"\n## shard: {args.n_cells:,} cells x {args.n_genes:,} genes, h5ad -> shards of {args.shard_size:,} "
            f"({platform.machine()}, {os.cpu_count()} cores)"
        )
        print("| workers | seconds | cells/s | CPU seconds | cores busy | peak RSS per worker (MB) |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            name = "one process" if row["workers"] == 0 else str(row["workers"])
            print(
                f"| {name} | {row['seconds']} | {row['cells_per_s']:,} | {row['cpu_s']} | "
                f"{row['cpu_s'] / row['seconds']:.2f} | {row['peak_worker_rss_mb'] or '-'} |"
            )
        by = {row["workers"]: row for row in rows}
        if 1 in by and 2 in by:
            ratio = by[2]["cells_per_s"] / by[1]["cells_per_s"]
            print(f"\n2 workers / 1 worker: {ratio:.2f}x (goal >= {GOAL}x): {'PASS' if ratio >= GOAL else 'FAIL'}")
            # A worker reads ahead on a thread of its own: one worker already keeps more than one
            # core busy, and on a machine of C cores N workers can gain at most C / (its cores busy).
            busy = by[1]["cpu_s"] / by[1]["seconds"]
            ceiling = (os.cpu_count() or 1) / busy
            print(
                f"one worker keeps {busy:.2f} cores busy: on {os.cpu_count()} cores "
                f"more workers can gain at most {ceiling:.2f}x; CPU seconds 2 workers / 1 worker "
                f"{by[2]['cpu_s'] / by[1]['cpu_s']:.2f} (1.00: the work divides with no overhead)"
            )
        print("every run's shards identical (count checksum, nnz per shard)")
        if args.json:
            Path(args.json).write_text(
                json.dumps({"rows": rows, "n_cells": args.n_cells, "n_genes": args.n_genes}, indent=1)
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
