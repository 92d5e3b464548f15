"""Atlas scale, end to end: simulate -> shards, h5ad -> `shard`, Ray Train, `embed` every cell,
`evaluate` on a subsample; per stage wall time, cells/s, peak RSS of the whole process tree, disk.

    .venv/bin/python benchmarks/atlas_scale.py --n-cells 10000000 --n-genes 2000 --compare-to 1000000
    .venv/bin/python benchmarks/atlas_scale.py --n-cells 200000 --steps 100      # the suite's version

Every stage is the real command (`hvae-pipeline simulate|shard|train|embed|evaluate`) in its own
process; its peak RSS is the largest sum of RSS over the process and all its descendants (Ray
workers included), sampled every 0.2 s from /proc. Checks, each PASS/FAIL:

- every obs id of the atlas is embedded exactly once (ids parsed back to rows, counted);
- the count checksum the shard writer took of the generator's rows (manifest ``count_checksum``:
  sum of counts and a hash-weighted sum keyed by source row and gene) equals the one recomputed
  from the shards as written (rows found through obs ``source_row``);
- with ``--compare-to M``: the same chain at M cells first, then the peak RSS of every stage at N
  within 1.25x of the stage at M (memory must not grow with cells).

The h5ad -> `shard` path runs at min(N, --h5ad-cells) cells (an h5ad is written for it first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RSS_LIMIT = 1.25


# ---------------------------------------------------------------- process-tree memory
def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return found


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def tree_rss(pid: int) -> int:
    """Sum of RSS over ``pid`` and all its descendants."""
    total, stack, seen = 0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _rss_bytes(current)
        stack += _children(current)
    return total


def run_stage(name: str, command: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``command``, sampling its process tree's RSS; raises with the log tail on failure."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
        peak = [0]

        def sample() -> None:
            while process.poll() is None:
                peak[0] = max(peak[0], tree_rss(process.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    wall = time.perf_counter() - started
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage {name} failed (exit {code}): {' '.join(command)}\n{tail}")
    return {"stage": name, "wall_s": round(wall, 1), "peak_rss_gb": round(peak[0] / 2**30, 3)}


def disk_gb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**30, 3)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return round(total / 2**30, 3)


# ---------------------------------------------------------------- checks
def shard_checksum(shards: Path) -> dict:
    """The count checksum recomputed from the shards as written (keyed by obs source_row)."""
    from anndata.io import read_elem

    from pipeline.data.loader import ShardedDataset
    from pipeline.data.shard_format import add_checksums, count_checksum

    dataset = ShardedDataset(str(shards))
    total = {"sum": 0.0, "weighted": 0}
    for k in range(len(dataset.shard_paths)):
        reader = dataset.shard(k)
        source_row = np.asarray(read_elem(reader.group["obs"]["source_row"]), dtype=np.int64)
        indptr, indices, data = reader.read(0, len(source_row))
        total = add_checksums(total, count_checksum(source_row, indptr, indices, data, dataset.n_vars))
    return total


def embedded_once(store: Path, n_cells: int) -> tuple[bool, str]:
    """Whether every generator row's obs id ('cell_<row>') appears exactly once in the store."""
    import zarr

    ids = zarr.open_group(str(store), mode="r")["obs_id"]
    seen = np.zeros(n_cells, np.int64)
    step = 1_000_000
    for lo in range(0, ids.shape[0], step):
        chunk = np.asarray(ids[lo : lo + step]).astype(object)
        rows = np.fromiter((int(name[5:]) for name in chunk), np.int64, len(chunk))  # 'cell_000000042' -> 42
        seen += np.bincount(rows, minlength=n_cells)[:n_cells]
    ok = ids.shape[0] == n_cells and bool((seen == 1).all())
    return ok, f"{ids.shape[0]:,} ids, {int((seen == 0).sum()):,} missing, {int((seen > 1).sum()):,} repeated"


# ---------------------------------------------------------------- the chain
def chain(n_cells: int, args, root: Path) -> dict:
    cli = [sys.executable, "-m", "pipeline"]
    root.mkdir(parents=True, exist_ok=True)
    shards, run, store = root / "shards", root / "runs", root / "embeddings.zarr"
    for path in (shards, run, store, root / "h5ad_shards", root / "atlas.h5ad", root / "embeddings_report"):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    stages = []

    def stage(name, command, cells, output=None):
        print(f"[{n_cells:,}] {name}: {' '.join(map(str, command[3:]))}", flush=True)
        result = run_stage(
            name, [str(c) for c in command], root / (re.sub(r"[^a-z0-9]+", "_", name).strip("_") + ".log")
        )
        result["cells_per_s"] = round(cells / result["wall_s"]) if cells else None
        result["disk_gb"] = disk_gb(output) if output else None
        stages.append(result)
        print(f"    {result}", flush=True)

    common = ["--n-genes", args.n_genes, "--n-donors", args.n_donors, "--seed", args.seed]
    shard_workers = ["--workers", args.shard_workers] if args.shard_workers else []
    stage(
        "simulate -> shards",
        [
            *cli,
            "simulate",
            shards,
            "--n-cells",
            n_cells,
            *common,
            "--format",
            "shards",
            "--shard-size",
            args.shard_size,
            *shard_workers,
        ],
        n_cells,
        shards,
    )
    h5ad_cells = min(n_cells, args.h5ad_cells)
    if h5ad_cells:
        stage(
            "simulate -> h5ad",
            [*cli, "simulate", root / "atlas.h5ad", "--n-cells", h5ad_cells, *common],
            h5ad_cells,
            root / "atlas.h5ad",
        )
        stage(
            "h5ad -> shard",
            [
                *(*cli, "shard", root / "atlas.h5ad", "--out", root / "h5ad_shards"),
                *("--shard-size", args.shard_size, *shard_workers),
            ],
            h5ad_cells,
            root / "h5ad_shards",
        )
    workers = args.workers
    stage(
        "train (Ray)" if workers else "train",
        [
            *cli,
            "train",
            f"data.path={shards}",
            "data.batch_key=donor_id",
            f"train.max_steps={args.steps}",
            f"train.batch_size={args.batch_size // max(1, workers)}",
            f"scaling.num_workers={workers}",
            f"run.storage_path={run}",
            "run.name=scale",
            f"checkpoint.every_steps={args.steps}",
            "train.log_every=50",
        ],
        args.steps * args.batch_size,
        run,
    )
    stage("embed", [*cli, "embed", "--checkpoint", run / "scale", "--source", shards, "--out", store], n_cells, store)
    stage(
        "evaluate",
        [
            *cli,
            "evaluate",
            "--embeddings",
            store,
            "--labels",
            "lineage,cell_type,subtype",
            "--batch-key",
            "donor_id",
            "--max-cells",
            args.eval_cells,
            "--no-maps",
        ],
        args.eval_cells,
        root / "embeddings_report",
    )

    manifest = json.loads((shards / "manifest.json").read_text())
    recorded = manifest.get("count_checksum")
    measured = shard_checksum(shards)
    once, detail = embedded_once(store, n_cells)
    checks = {
        "every obs id embedded once": (once, detail),
        "count checksum generator -> shards": (
            recorded is not None
            and recorded["sum"] == measured["sum"]
            and int(recorded["weighted"]) == measured["weighted"],
            f"manifest {recorded}, shards {measured}",
        ),
    }
    report = (
        json.loads((root / "embeddings_report" / "metrics.json").read_text())
        if (root / "embeddings_report" / "metrics.json").exists()
        else None
    )
    return {
        "n_cells": n_cells,
        "stages": stages,
        "checks": {k: {"pass": v[0], "detail": v[1]} for k, v in checks.items()},
        "evaluate": _knn(report),
    }


def _knn(report) -> dict | None:
    if not report:
        return None
    return {
        r["representation"]: {label: round(v["knn_accuracy"], 3) for label, v in r["labels"].items()}
        for r in report.get("results", [])
    }


def table(results: list[dict]) -> str:
    lines = ["| cells | stage | wall (s) | cells/s | peak RSS (GB) | disk (GB) |", "|---|---|---|---|---|---|"]
    for result in results:
        for s in result["stages"]:
            rate = "-" if s["cells_per_s"] is None else f"{s['cells_per_s']:,}"
            disk = "-" if s["disk_gb"] is None else s["disk_gb"]
            lines.append(
                f"| {result['n_cells']:,} | {s['stage']} | {s['wall_s']} | {rate} | {s['peak_rss_gb']} | {disk} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cells", type=int, default=10_000_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--n-donors", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare-to",
        type=int,
        default=None,
        help="run the chain at this many cells first; "
        f"check every stage's peak RSS at --n-cells within {RSS_LIMIT}x of it",
    )
    parser.add_argument("--h5ad-cells", type=int, default=1_000_000, help="cells of the h5ad -> shard stage (0: skip)")
    parser.add_argument("--shard-size", type=int, default=65_536)
    parser.add_argument("--steps", type=int, default=300, help="training steps (fixed, whatever the cells)")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch size")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train CPU workers (0: one process)")
    parser.add_argument(
        "--shard-workers",
        type=int,
        default=0,
        help="Ray tasks of `simulate --format shards` and `shard` (0: one process)",
    )
    parser.add_argument("--eval-cells", type=int, default=50_000)
    parser.add_argument("--out", default="outputs/atlas_scale", help="working directory (needs ~0.6 GB per 1M cells)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the outputs (default: removed after each size)")
    args = parser.parse_args()

    sizes = ([args.compare_to] if args.compare_to else []) + [args.n_cells]
    results = []
    for n in sizes:
        root = Path(args.out) / f"n{n}"
        results.append(chain(n, args, root))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    checks = {}
    for result in results:
        for name, check in result["checks"].items():
            checks[f"{name} ({result['n_cells']:,})"] = check
    if args.compare_to:
        small, large = results
        for a, b in zip(small["stages"], large["stages"], strict=True):
            ratio = b["peak_rss_gb"] / max(a["peak_rss_gb"], 1e-9)
            checks[f"peak RSS {b['stage']}: {large['n_cells']:,} / {small['n_cells']:,} <= {RSS_LIMIT}"] = {
                "pass": ratio <= RSS_LIMIT,
                "detail": f"{b['peak_rss_gb']} / {a['peak_rss_gb']} GB = {ratio:.2f}x",
            }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB"
    print(
        f"\nmachine: {machine}; genes {args.n_genes}, donors {args.n_donors}, {args.steps} training steps of "
        f"{args.batch_size} cells on {args.workers} Ray workers\n"
    )
    print(table(results))
    print()
    for name, check in checks.items():
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {name}: {check['detail']}")
    for result in results:
        if result["evaluate"]:
            print(
                f"\nkNN accuracy at {result['n_cells']:,} cells ({args.eval_cells:,} evaluated): {result['evaluate']}"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": machine, "args": vars(args), "results": results, "checks": checks}, indent=2)
        )
    if not all(c["pass"] for c in checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
