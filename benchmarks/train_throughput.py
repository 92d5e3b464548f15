"""Training throughput: the same HVAE fed from shards vs from GPU-resident data (the ceiling).

    .venv/bin/python benchmarks/train_throughput.py --shards DIR [--steps 300] [--batch-size 4096]
        [--precision bf16] [--hidden-dim 512] [--device cuda] [--json out.json]
    .venv/bin/python benchmarks/train_throughput.py --simulate 200000 --n-genes 8000 ...   # writes shards first

Single process, no Ray (the GPU machine has no Ray): both paths run ``pipeline.train.step.Trainer``
steps on the same model; "resident" first copies ``--resident-cells`` cells to the device as a
dense tensor and draws random batches there, so it measures compute alone; "shards" streams
``ShardedDataset.loader`` batches and densifies them on the device, as training does. Reports
cells/s, the ratio shards/resident, the loader alone (no training), peak device memory and, on
CUDA, GPU utilisation sampled with nvidia-smi.

The peer: with ``--scvi-python PY`` (a Python with scvi-tools installed, e.g. a venv made with
``pip install scvi-tools``) the first ``--scvi-cells`` cells of the same shards are written to an
h5ad and scvi-tools' SCVI trains on them at each of ``--scvi-batch-sizes``
(``peers/scvi_train_peer.py``, its own process and environment); the report adds our
from-shards speed over scvi-tools' best batch size (goal >= 10).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvae import HVAEConfig, HierarchicalVAE, fit_gene_modules  # noqa: E402
from pipeline.data import ShardedDataset, densify  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.train.step import Trainer  # noqa: E402


def make_trainer(n_genes: int, args) -> Trainer:
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=n_genes, latent_dims=(32, 16, 8), hidden_dim=args.hidden_dim, validate_inputs=False)
    config = fit_gene_modules(
        config, torch.poisson(torch.full((1024, n_genes), 2.0))
    )  # modules of unstructured counts: the same cost as the data's
    return Trainer(
        HierarchicalVAE(config), TrainConfig(precision=args.precision, kl_warmup_steps=100), device=args.device
    )


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(trainer: Trainer, batches, steps: int, warmup: int, device: str) -> float:
    """cells/s over ``steps`` steps after ``warmup`` steps."""
    iterator = iter(batches)
    for _ in range(warmup):
        trainer.step(next(iterator))
    sync(device)
    start, cells = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(iterator)
        trainer.step(batch)
        cells += batch["counts"].shape[0]
    sync(device)
    return cells / (time.perf_counter() - start)


def resident_batches(dataset: ShardedDataset, args):
    """Dense counts on the device, then random batches drawn there (no host work per step)."""
    rows, parts = 0, []
    for batch in dataset.loader(4096, seed=1):
        parts.append(densify(batch["counts"], args.device))
        rows += parts[-1].shape[0]
        if rows >= args.resident_cells:
            break
    counts = torch.cat(parts)[: args.resident_cells]
    generator = torch.Generator(device=args.device).manual_seed(0)
    while True:
        index = torch.randint(0, counts.shape[0], (args.batch_size,), device=args.device, generator=generator)
        yield {"counts": counts[index]}


def shard_batches(dataset: ShardedDataset, args):
    epoch = 0
    while True:
        yield from dataset.loader(args.batch_size, seed=0, epoch=epoch, num_workers=args.loader_workers)
        epoch += 1


def loader_only(dataset: ShardedDataset, args) -> float:
    """Batches densified on the device per second, no model: the loader's ceiling here."""
    iterator, cells = iter(shard_batches(dataset, args)), 0
    for _ in range(3):
        densify(next(iterator)["counts"], args.device)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(iterator)
        densify(batch["counts"], args.device)
        cells += batch["counts"].shape[0]
    sync(args.device)
    return cells / (time.perf_counter() - start)


def scvi_rows(dataset: ShardedDataset, args) -> list[dict]:
    """scvi-tools SCVI on the first ``--scvi-cells`` cells of the shards, one row per batch size."""
    import tempfile

    import anndata as ad

    from pipeline.data.sources import ShardSource

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.h5ad"
        ad.AnnData(ShardSource(str(args.shards)).rows(0, min(args.scvi_cells, dataset.n_obs))).write_h5ad(path)
        command = [
            args.scvi_python,
            str(Path(__file__).parent / "peers" / "scvi_train_peer.py"),
            "--h5ad",
            str(path),
            "--batch-sizes",
            args.scvi_batch_sizes,
            "--epochs",
            str(args.scvi_epochs),
            "--accelerator",
            "gpu" if args.device.startswith("cuda") else "cpu",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"scvi-tools peer failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for result in results:
        print(
            f"{'scvi-tools batch ' + str(result['batch_size']):>22s}: {result['cells_per_s']:>10,.0f} cells/s",
            flush=True,
        )
    return results


class GpuSampler:
    """Mean GPU utilisation from nvidia-smi while a block runs (CUDA only)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self):
        def run() -> None:
            while not self._stop.is_set():
                try:
                    out = subprocess.run(
                        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout
                    self.samples.append(float(out.split()[0]))
                except Exception:
                    return
                self._stop.wait(0.5)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def measure(name: str, fn, args) -> dict:
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() if args.device.startswith("cuda") else _Null() as sampler:
        cells_per_s = fn()
    result = {"path": name, "cells_per_s": round(cells_per_s), "gpu_util_percent": getattr(sampler, "mean", None)}
    if args.device.startswith("cuda"):
        result["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(f"{name:>22s}: {cells_per_s:>10,.0f} cells/s", flush=True)
    return result


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--simulate", type=int, default=None, help="write this many synthetic cells as shards first")
    parser.add_argument("--n-genes", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resident-cells", type=int, default=100_000)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--scvi-python", default=None, help="a Python with scvi-tools: adds the peer's column")
    parser.add_argument("--scvi-cells", type=int, default=100_000)
    parser.add_argument("--scvi-batch-sizes", default="128,1024")
    parser.add_argument("--scvi-epochs", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.simulate:
        from pipeline.data import ShardSettings, write_shards
        from pipeline.data.sources import SyntheticSource
        from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

        args.shards = args.shards or Path(f"benchmarks/.work/train_{args.simulate}_{args.n_genes}")
        if not (args.shards / "manifest.json").exists():
            atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=args.simulate, n_genes=args.n_genes, n_donors=16))
            write_shards(SyntheticSource(atlas), str(args.shards), ShardSettings())
    if args.shards is None:
        parser.error("give --shards DIR or --simulate N")
    dataset = ShardedDataset(str(args.shards))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"{dataset.n_obs:,} cells x {dataset.n_vars:,} genes; {device_name}; batch {args.batch_size}; {args.precision}"
    )
    results = [
        measure("loader -> device only", lambda: loader_only(dataset, args), args),
        measure(
            "GPU-resident (ceiling)",
            lambda: time_steps(
                make_trainer(dataset.n_vars, args),
                resident_batches(dataset, args),
                args.steps,
                args.warmup,
                args.device,
            ),
            args,
        ),
        measure(
            "from shards",
            lambda: time_steps(
                make_trainer(dataset.n_vars, args), shard_batches(dataset, args), args.steps, args.warmup, args.device
            ),
            args,
        ),
    ]
    ratio = results[2]["cells_per_s"] / results[1]["cells_per_s"]
    print(f"from shards / resident = {ratio:.2f} (goal >= 0.5)")
    report = {
        "device": device_name,
        "n_obs": dataset.n_obs,
        "n_vars": dataset.n_vars,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "hidden_dim": args.hidden_dim,
        "results": results,
        "shards_over_resident": round(ratio, 3),
        "torch": torch.__version__,
    }
    if args.scvi_python:
        report["scvi_tools"] = scvi_rows(dataset, args)
        best = max(row["cells_per_s"] for row in report["scvi_tools"])
        report["shards_over_scvi_best"] = round(results[2]["cells_per_s"] / best, 2)
        print(f"from shards / scvi-tools best = {report['shards_over_scvi_best']:.1f}x (goal >= 10)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
