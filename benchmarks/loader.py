"""Loader benchmark: our sharded loader vs annbatch 0.3.1 vs tiledbsoma-ml 0.1.0 on the same cells.

    .venv/bin/python benchmarks/loader.py                                   # 100k and 1M cells x 8k genes
    .venv/bin/python benchmarks/loader.py --sizes 20000 --n-genes 2000      # a quick run
    .venv/bin/python benchmarks/loader.py --sizes 100000,1000000 --json benchmarks/loader.json

For each size it simulates an atlas (``hvae-pipeline simulate``, donors stored contiguously; .h5ad,
which all three builders read), builds each tool's store from it (timed, in a subprocess of its
own), measures the store on disk, then runs each loader in its own subprocess, one after another:
batch size 4,096, shuffled, sparse CSR batches (never densified). Reported per loader: build time,
store size, cells/s, time to first batch, peak RSS (ru_maxrss of the loading process, and its RSS
after imports), and batch mixing: the mean Shannon entropy (nats) of donor labels within a batch,
next to the ceiling (the entropy of the global donor distribution; ln(n_donors) for equal donors).

Timing: before each run every file of that store is read once (page cache warm, untimed); inside
the run, a warm-up pass of ``--warmup`` batches (epoch 1) is discarded, then epoch 0 is timed from
the creation of its iterator to its last batch (or ``--max-batches``). Generated data and built
stores are cached under ``--workdir`` keyed by size; ``--rebuild`` builds the stores again.
annbatch needs Python >= 3.12: its peer runs in benchmarks/.venv312, created here if missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = HERE / "peers"
VENV312 = HERE / ".venv312"
PY312_CANDIDATES = [
    os.environ.get("ANNBATCH_PYTHON", ""),
    str(Path.home() / ".pyenv/versions/3.12.1/bin/python"),
    "python3.12",
    "python3.13",
]
ANNBATCH_REQS = ["annbatch==0.3.1", "zarrs"]
TILEDBSOMA_ML_REQ = "tiledbsoma-ml==0.1.0"
TOOLS = ("ours", "annbatch", "tiledbsoma-ml")
STORE_NAMES = {"ours": "ours", "annbatch": "annbatch.zarr", "tiledbsoma-ml": "tiledbsoma.soma"}
SCRIPTS = {"ours": "ours_peer.py", "annbatch": "annbatch_peer.py", "tiledbsoma-ml": "tiledbsoma_ml_peer.py"}


def log(message: str) -> None:
    print(f"[loader-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_venv312() -> Path:
    """The annbatch venv's python; makes the venv (pip install annbatch==0.3.1 zarrs) when it is missing."""
    python = VENV312 / "bin" / "python"
    if python.exists():
        return python
    base = next((c for c in PY312_CANDIDATES if c and shutil.which(c)), None)
    if base is None:
        sys.exit("annbatch needs Python >= 3.12: none found (set ANNBATCH_PYTHON=/path/to/python3.12)")
    log(f"{VENV312} is missing: creating it with {base} and installing {' '.join(ANNBATCH_REQS)} (a minute or two)")
    subprocess.run([shutil.which(base), "-m", "venv", str(VENV312)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *ANNBATCH_REQS], check=True)
    return python


def ensure_tiledbsoma_ml() -> None:
    """tiledbsoma-ml goes into this venv with --no-deps: its dependencies (tiledbsoma, torch, numba) are
    already here and a plain install could move torch or tiledbsoma to other versions."""
    from importlib.util import find_spec

    if find_spec("tiledbsoma_ml") is not None:
        return
    if find_spec("tiledbsoma") is None or find_spec("numba") is None:
        sys.exit("tiledbsoma-ml needs tiledbsoma and numba in this venv: pip install tiledbsoma numba")
    log(f"tiledbsoma-ml is missing: pip install --no-deps {TILEDBSOMA_ML_REQ} into {sys.prefix}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", TILEDBSOMA_ML_REQ], check=True)


def python_for(tool: str) -> str:
    return str(ensure_venv312()) if tool == "annbatch" else sys.executable


def run_step(tool: str, step: str, argv: list[str], log_path: Path) -> dict:
    """Run one peer subcommand in a fresh process; its result is the last JSON line of stdout."""
    cmd = [python_for(tool), str(PEERS / SCRIPTS[tool]), step, *argv]
    log(f"{tool} {step}: {' '.join(cmd[1:])}  (stderr -> {log_path})")
    start = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text()[-2000:]
        log(f"{tool} {step} FAILED (exit {proc.returncode}):\n{tail}")
        return {"tool": tool, "step": step, "error": f"exit {proc.returncode}", "stderr_tail": tail[-500:]}
    return {**json.loads(lines[-1]), "wall_s": round(wall, 2)}


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def warm_page_cache(path: Path) -> float:
    """Read every file under ``path`` once (untimed), so each loader starts from a warm page cache."""
    start, buffer = time.perf_counter(), bytearray(16 << 20)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def ensure_source(args: argparse.Namespace, n_cells: int, size_dir: Path) -> Path:
    source = size_dir / "source.h5ad"
    if source.exists():
        return source
    size_dir.mkdir(parents=True, exist_ok=True)
    # ~8 bytes per non-zero, ~18% non-zero: the source plus three stores need about 2.5x the source.
    need = int(n_cells * args.n_genes * 0.18 * 8 * 2.5)
    free = shutil.disk_usage(size_dir).free
    if free < need:
        log(f"WARNING: {free / 1e9:.0f} GB free under {size_dir}, this size needs roughly {need / 1e9:.0f} GB")
    partial = size_dir / "source.partial.h5ad"
    partial.unlink(missing_ok=True)  # left by an interrupted run
    log(
        f"simulating {n_cells:,} cells x {args.n_genes:,} genes ({args.n_donors} donors) -> {source} "
        "(~1.6k cells/s at 8k genes: 1M cells takes ~10 min)"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "simulate",
            str(partial),
            "--n-cells",
            str(n_cells),
            "--n-genes",
            str(args.n_genes),
            "--n-donors",
            str(args.n_donors),
            "--seed",
            "0",
        ],
        check=True,
        cwd=ROOT,
        stdout=sys.stderr,
    )
    partial.rename(source)
    return source


def build_key(args: argparse.Namespace, tool: str, source: Path) -> str:
    """What a cached store was built from and with: it is rebuilt when this changes (or with --rebuild)."""
    from importlib.metadata import version

    stat = source.stat()
    origin = f"source {stat.st_size}:{stat.st_mtime_ns}"
    if tool == "ours":  # our writer is under development: key on its source code
        files = sorted((ROOT / "pipeline" / "data").glob("*.py")) + [ROOT / "pipeline" / "cli.py"]
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()[:16]
        return f"{origin} pipeline.data sha256:{digest} shard_size={args.shard_size} compression={args.compression}"
    if tool == "annbatch":
        return f"{origin} {' '.join(ANNBATCH_REQS)} dataset_size={args.annbatch_dataset_size}"
    return f"{origin} tiledbsoma=={version('tiledbsoma')}"


def ensure_store(args: argparse.Namespace, tool: str, source: Path, size_dir: Path) -> dict:
    store, record = size_dir / STORE_NAMES[tool], size_dir / f"{tool}.build.json"
    key = build_key(args, tool, source)
    if record.exists() and store.exists() and not args.rebuild:
        cached = json.loads(record.read_text())
        if cached.get("build_key") == key:
            log(f"{tool}: reusing {store} (built earlier; --rebuild to build again)")
            return {**cached, "cached": True}
        log(f"{tool}: {store} was built with {cached.get('build_key')!r}, now {key!r}: rebuilding")
    shutil.rmtree(store, ignore_errors=True)
    record.unlink(missing_ok=True)
    argv = [str(source), str(store)]
    if tool == "ours" and args.shard_size:
        argv += ["--shard-size", str(args.shard_size)]
    if tool == "ours" and args.compression:
        argv += ["--compression", args.compression]
    if tool == "annbatch":
        argv += ["--dataset-size", args.annbatch_dataset_size]
    result = run_step(tool, "build", argv, size_dir / f"{tool}.build.log")
    if "error" not in result:
        result["store_bytes"], result["build_key"] = tree_bytes(store), key
        record.write_text(json.dumps(result))
    return result


def donor_ceiling(source: Path) -> dict:
    import anndata as ad
    import h5py
    import numpy as np

    sys.path.insert(0, str(PEERS))
    from _common import distribution_entropy

    with h5py.File(source, "r") as f:
        donors = np.asarray(ad.io.read_elem(f["obs"]["donor_id"]))
    _, codes = np.unique(donors, return_inverse=True)
    n = int(codes.max()) + 1
    return {
        "n_donors": n,
        "ln_n_donors": round(math.log(n), 4),
        "global_entropy": round(distribution_entropy(codes), 4),
    }


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)

    def versions(names: list[str]) -> dict:
        out = {}
        for name in names:
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = None
        return out

    info = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "mem_total_mb": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "main_venv": versions(
            ["hvae-pipeline", "torch", "numpy", "scipy", "anndata", "zarr", "tiledbsoma", "tiledbsoma-ml", "numba"]
        ),
    }
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    info["git_commit"] = git.stdout.strip() or None
    code = (
        "import json, platform; from importlib.metadata import version as v; print(json.dumps({'python': "
        "platform.python_version(), **{n: v(n) for n in ['annbatch', 'zarr', 'zarrs', 'anndata', 'numpy', 'scipy']}}))"
    )
    if (VENV312 / "bin" / "python").exists():
        probe = subprocess.run([str(VENV312 / "bin" / "python"), "-c", code], capture_output=True, text=True)
        info["annbatch_venv"] = json.loads(probe.stdout) if probe.returncode == 0 else probe.stderr[-300:]
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated cell counts")
    parser.add_argument("--n-genes", type=int, default=8000)
    parser.add_argument("--n-donors", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    parser.add_argument("--workdir", type=Path, default=HERE / ".work")
    parser.add_argument("--rebuild", action="store_true", help="build the stores again (the source is kept)")
    parser.add_argument("--warmup", type=int, default=3, help="batches of a discarded warm-up pass")
    parser.add_argument("--max-batches", type=int, default=None, help="time this many batches, not a full epoch")
    parser.add_argument("--no-warm-cache", action="store_true", help="do not read each store before its run")
    parser.add_argument("--shard-size", type=int, default=None, help="ours: cells per shard (default: the CLI's)")
    parser.add_argument("--num-workers", type=int, default=None, help="ours: loader workers (default: the loader's)")
    parser.add_argument("--compression", default=None, help="ours: shard codec (lz4, zstd or none; default: the CLI's)")
    parser.add_argument(
        "--segment-rows", type=int, default=None, help="ours: rows permuted together (1: full row shuffle)"
    )
    parser.add_argument(
        "--annbatch-dataset-size",
        default="1GB",
        help="annbatch build: rows or size per dataset held in RAM while shuffling (its default, "
        "20GB, would hold a whole 1M x 8k atlas in memory)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}; choose from {TOOLS}")
    if "annbatch" in tools:
        ensure_venv312()
    if "tiledbsoma-ml" in tools:
        ensure_tiledbsoma_ml()

    report = {"machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()}, "sizes": []}
    for n_cells in [int(s) for s in args.sizes.split(",")]:
        size_dir = args.workdir / f"cells{n_cells}_genes{args.n_genes}_donors{args.n_donors}"
        source = ensure_source(args, n_cells, size_dir)
        entry = {
            "n_cells": n_cells,
            "n_genes": args.n_genes,
            "source_bytes": tree_bytes(source),
            **donor_ceiling(source),
            "tools": {},
        }
        for tool in tools:
            build = ensure_store(args, tool, source, size_dir)
            entry["tools"][tool] = {"build": build}
            if "error" in build:
                continue
            store = size_dir / STORE_NAMES[tool]
            if not args.no_warm_cache:
                log(f"{tool}: reading {build['store_bytes'] / 1e9:.2f} GB of store files into the page cache")
                entry["tools"][tool]["warm_cache_s"] = round(warm_page_cache(store), 2)
            argv = [str(store), "--batch-size", str(args.batch_size), "--warmup", str(args.warmup)]
            if args.max_batches:
                argv += ["--max-batches", str(args.max_batches)]
            if tool == "ours" and args.num_workers is not None:
                argv += ["--num-workers", str(args.num_workers)]
            if tool == "ours" and args.segment_rows is not None:
                argv += ["--segment-rows", str(args.segment_rows)]
            entry["tools"][tool]["run"] = run_step(tool, "run", argv, size_dir / f"{tool}.run.log")
        report["sizes"].append(entry)
        if args.json:  # after every size, so a long run leaves partial results behind
            args.json.write_text(json.dumps(report, indent=1))

    sys.path.insert(0, str(PEERS))
    from _report import markdown

    print(markdown(report))
    if args.json:
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
