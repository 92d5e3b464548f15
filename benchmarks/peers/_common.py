"""Measurement helpers shared by the peer runners (numpy only: also imported by the Python 3.12 venv).

Every runner wraps its tool's loader as ``make_iter(epoch) -> iterator of (rows, nnz, donor_codes)``
and calls ``emit({..., **measure(make_iter, batch_size, warmup_batches, max_batches)})``: the same
warm-up, clock, RSS and mixing score for every tool.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np


def rss_now_mb() -> float:
    """Current resident set size of this process (VmRSS), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class WorkerWatch:
    """Peak RSS (VmHWM) of this process's live child processes: loader workers, if a loader forks any.

    ru_maxrss(RUSAGE_CHILDREN) will not do: it also counts any helper a library forks (a forked child
    starts with the parent's resident pages), and only children already reaped. Sampled once a batch.
    """

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}

    def sample(self) -> None:
        pids: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as handle:
                    pids.update(int(pid) for pid in handle.read().split())
            except OSError:
                continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/status") as status:
                    hwm = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:")), 0.0)
            except OSError:  # exited in between
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)

    def result(self) -> dict:
        return {
            "workers_seen": len(self.peaks),
            "peak_rss_workers_mb": round(max(self.peaks.values()), 1) if self.peaks else 0.0,
        }


def batch_entropy(codes: np.ndarray) -> float:
    """Shannon entropy (nats) of the label distribution inside one batch."""
    counts = np.bincount(codes)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log(p)).sum())


def distribution_entropy(codes: np.ndarray) -> float:
    """Shannon entropy (nats) of the global label distribution: the best a batch can score."""
    return batch_entropy(np.asarray(codes))


def measure(make_iter, batch_size: int, warmup_batches: int, max_batches: int | None) -> dict:
    """Warm up on a short pass, then time one pass; ``make_iter(epoch)`` yields (rows, nnz, donor_codes).

    Warm-up: the first ``warmup_batches`` batches of epoch 1, discarded (opens files, JIT-compiles,
    fills caches). Timed: epoch 0 from the moment its iterator is created to its last batch (or
    ``max_batches`` batches), so a loader's per-epoch start-up (first IO batch, prefetch) counts.
    The mixing score covers every full batch of the timed pass.
    """
    workers = WorkerWatch()
    if warmup_batches > 0:
        warm = make_iter(1)
        for i, _ in enumerate(warm, start=1):
            workers.sample()
            if i >= warmup_batches:
                break
        close = getattr(warm, "close", None)
        if close is not None:
            close()
        del warm
    rows = nnz = batches = 0
    entropies: list[float] = []
    first = None
    start = time.perf_counter()
    for n_rows, n_nnz, codes in make_iter(0):
        if first is None:
            first = time.perf_counter() - start
        workers.sample()
        batches += 1
        rows += n_rows
        nnz += n_nnz
        if n_rows == batch_size:  # a ragged last batch has a lower ceiling: leave it out of the mean
            entropies.append(batch_entropy(np.asarray(codes)))
        if max_batches is not None and batches >= max_batches:
            break
    elapsed = time.perf_counter() - start
    return {
        "timed_batches": batches,
        "timed_rows": rows,
        "timed_s": round(elapsed, 4),
        "cells_per_s": round(rows / elapsed, 1) if elapsed > 0 else None,
        "nnz_per_s": round(nnz / elapsed, 1) if elapsed > 0 else None,
        "first_batch_s": round(first, 4) if first is not None else None,
        "warmup_batches": warmup_batches,
        "mixing_entropy": round(float(np.mean(entropies)), 4) if entropies else None,
        "mixing_entropy_min": round(float(np.min(entropies)), 4) if entropies else None,
        # Worker processes are not in ru_maxrss(SELF): the largest one's peak, when the loader ran any.
        **workers.result(),
    }


def emit(record: dict) -> None:
    """Print the one JSON result line (the orchestrator reads the last line of stdout)."""
    record.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    record.setdefault("python", sys.version.split()[0])
    record.setdefault("pid", os.getpid())
    sys.stdout.flush()
    print(json.dumps(record), flush=True)


def peer_parser(description: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``build SOURCE OUT`` / ``run STORE`` command line every runner shares; each runner adds its
    own options to the two returned subparsers, then calls ``run_command``."""
    parser = argparse.ArgumentParser(description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build")
    build.add_argument("source")
    build.add_argument("out")
    run = sub.add_parser("run")
    run.add_argument("store")
    run.add_argument("--batch-size", type=int, default=4096)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--warmup", type=int, default=3)
    run.add_argument("--max-batches", type=int, default=None)
    return parser, build, run


def run_command(parser: argparse.ArgumentParser, build, run) -> None:
    args = parser.parse_args()
    build(args) if args.command == "build" else run(args)
