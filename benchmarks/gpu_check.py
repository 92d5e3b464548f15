"""The one prepared GPU check: every hot path of the pipeline on one device, one table.

    python benchmarks/gpu_check.py                                   # a GPU: 1M cells x 8,000 genes
    python benchmarks/gpu_check.py --device cpu --n-cells 20000 --n-genes 500 --hidden-dim 64 \\
        --batch-size 512 --steps 4 --no-compile                     # the CPU smoke test (tests/)

Needs PyTorch plus the project's light dependencies (zarr, numcodecs, anndata, fsspec, scipy,
pandas, pydantic, pyyaml, tqdm); no Ray. It generates its own data: the synthetic atlas's tree,
donors and library sizes, with the negative binomial counts drawn on the device (the numpy
generator would take most of the budget at 1M x 8,000), written as shards on local disk. Then:

- loader -> device: shard batches moved and densified on the device, no model;
- training from GPU-resident data (the ceiling) in bf16, eager and ``torch.compile``d, and
  from shards (the loader feeding the same step): batch 4,096, latent 64/32/16, hidden 512;
- syncs per training step, counted with ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA);
- ``embed`` end to end (shards -> every level -> Zarr), cells/s;
- peak device memory and GPU utilisation (nvidia-smi) for each.

Prints one table and writes it as JSON (``--json``, default ``gpu_check.json`` in the work
directory). Goals on one GPU: from shards >= 50% of GPU-resident and >= 430k cells/s; embed
>= 1M cells/s end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hvae import HVAEConfig, HierarchicalVAE, fit_gene_modules  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data import ShardedDataset, ShardSettings, write_shards  # noqa: E402
from pipeline.data.sources import Source  # noqa: E402
from pipeline.data.synthetic import RNG_CHUNK, SyntheticAtlas, SyntheticAtlasSpec  # noqa: E402
from pipeline.train.step import Trainer  # noqa: E402
from train_throughput import GpuSampler, _Null, resident_batches, shard_batches, sync  # noqa: E402
from train_throughput import loader_only as time_loader  # noqa: E402


class DeviceSyntheticSource(Source):
    """The synthetic atlas's cells (tree, donors, composition, library sizes and NB dispersion
    as ``SyntheticAtlas``), with the counts drawn by torch on ``device``. Deterministic per
    row chunk, so any rows can be generated alone; not bit-identical to the numpy generator."""

    def __init__(self, atlas: SyntheticAtlas, device: torch.device) -> None:
        self.atlas, self.device, spec = atlas, device, atlas.spec
        self.uri = f"device-synthetic(seed={spec.seed}, {device.type})"
        self.var = atlas.var()[["feature_name"]].rename_axis("feature_id")
        self._selected = np.arange(spec.n_cells)
        self.profiles = torch.from_numpy(atlas.leaf_log_profiles).to(device)
        self.cell_loadings = torch.from_numpy(atlas.cell_loadings).to(device)
        self.theta = torch.from_numpy(atlas.theta).to(device)
        donors = [atlas._donor_cached(d) for d in range(spec.n_donors)]
        self.donor_shift = torch.from_numpy(np.stack([d[1] for d in donors])).to(device)
        self.donor_library = torch.tensor([d[2] for d in donors], device=device)

    def read_obs(self) -> pd.DataFrame:
        obs = self.atlas.obs_rows(0, self.atlas.spec.n_cells)
        obs["source_row"] = np.arange(len(obs), dtype=np.int64)
        return obs

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        parts = []
        for chunk in range(start // RNG_CHUNK, -(-stop // RNG_CHUNK)):
            counts = self._chunk(chunk)
            lo, hi = max(start - chunk * RNG_CHUNK, 0), min(stop - chunk * RNG_CHUNK, counts.shape[0])
            parts.append(counts[lo:hi])
        return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]

    def _chunk(self, chunk: int) -> sp.csr_matrix:
        atlas, spec = self.atlas, self.atlas.spec
        rows = np.arange(chunk * RNG_CHUNK, min((chunk + 1) * RNG_CHUNK, spec.n_cells))
        uniforms = np.random.default_rng([spec.seed, 2, chunk]).random(len(rows))
        donors = atlas.donors_of(rows).astype(np.int64)
        leaves = torch.from_numpy(atlas._leaves(donors, uniforms)).to(self.device)
        donors = torch.from_numpy(donors).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(spec.seed * 1_000_003 + chunk)
        n = len(rows)
        scores = torch.randn(n, spec.n_cell_factors, device=self.device, generator=generator) * spec.cell_variation_sd
        log_rate = self.profiles[leaves] + self.donor_shift[donors] + scores @ self.cell_loadings
        log_library = (
            math.log(spec.mean_library_size)
            + self.donor_library[donors]
            + torch.randn(n, device=self.device, generator=generator) * spec.library_log_sd
        )
        mean = torch.softmax(log_rate, dim=1) * torch.exp(log_library).unsqueeze(1)
        rate = torch._standard_gamma(self.theta.expand_as(mean).contiguous()) * (mean / self.theta)
        counts = torch.poisson(rate, generator=generator).to_sparse_csr()
        return sp.csr_matrix(
            (
                counts.values().cpu().numpy().astype(np.float32),
                counts.col_indices().cpu().numpy(),
                counts.crow_indices().cpu().numpy(),
            ),
            shape=(n, spec.n_genes),
        )

    def provenance(self) -> dict:
        return {"generator": "benchmarks/gpu_check.py DeviceSyntheticSource", "spec": self.atlas.spec.to_dict()}


def make_trainer(n_genes: int, args, compile_model: bool = False) -> Trainer:
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=n_genes, latent_dims=tuple(args.latent_dims), hidden_dim=args.hidden_dim)
    config = fit_gene_modules(
        config, torch.poisson(torch.full((1024, n_genes), 2.0))
    )  # modules of unstructured counts: the same cost as the data's
    train = TrainConfig(precision=args.precision, kl_warmup_steps=100, compile=compile_model)
    return Trainer(HierarchicalVAE(config), train, device=args.device)


def time_training(trainer: Trainer, batches, args, check: bool) -> float:
    iterator = iter(batches)
    for _ in range(args.warmup):
        trainer.step(next(iterator), check=check)
    sync(args.device)
    start, cells = time.perf_counter(), 0
    for _ in range(args.steps):
        batch = next(iterator)
        trainer.step(batch, check=check)
        cells += batch["counts"].shape[0]
    trainer.read_metrics()  # the logging read, once
    sync(args.device)
    return cells / (time.perf_counter() - start)


def syncs_per_step(dataset: ShardedDataset, args) -> float | None:
    """Device synchronisations per training step from shards (CUDA's sync debug mode)."""
    if args.device.type != "cuda":
        return None
    trainer = make_trainer(dataset.n_vars, args)
    iterator = iter(shard_batches(dataset, args))
    for _ in range(3):
        trainer.step(next(iterator))
    n = 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(n):
                trainer.step(next(iterator))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / n


def time_embed(shards: Path, work: Path, args) -> float:
    from pipeline.embed import EmbedSettings, embed
    from pipeline.train.checkpoint import save_checkpoint

    dataset = ShardedDataset(str(shards))
    model = make_trainer(dataset.n_vars, args).model
    checkpoint = work / "checkpoint"
    save_checkpoint(checkpoint, model, model.config, None, None, dataset.feature_ids, None, [])
    out = work / "embeddings.zarr"
    shutil.rmtree(out, ignore_errors=True)
    result = embed(
        str(checkpoint),
        {"source": str(shards)},
        str(out),
        EmbedSettings(
            batch_size=args.embed_batch_size, chunk_rows=args.embed_chunk_rows, progress=False, device=args.device.type
        ),
        echo=lambda *_: None,
    )
    return dataset.n_obs / result["seconds"]


def measure(name: str, fn, args) -> dict:
    cuda = args.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with GpuSampler() if cuda else _Null() as sampler:
        value = fn()
    row = {
        "path": name,
        "cells_per_s": None if value is None else round(value),
        "seconds": round(time.perf_counter() - started, 1),
        "gpu_util_percent": getattr(sampler, "mean", None),
        "peak_device_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
    }
    print(f"{name:>34s}: {'-' if value is None else f'{value:,.0f}'} cells/s ({row['seconds']} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[64, 32, 16])
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per training path")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--resident-cells", type=int, default=65_536)
    parser.add_argument("--embed-batch-size", type=int, default=16_384)
    parser.add_argument("--embed-chunk-rows", type=int, default=65_536)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--work-dir", type=Path, default=Path("benchmarks/.work/gpu_check"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.device = torch.device(args.device)
    started = time.perf_counter()
    work = args.work_dir
    shards = work / f"shards_{args.n_cells}_{args.n_genes}"
    if not (shards / "manifest.json").exists():
        spec = SyntheticAtlasSpec(n_cells=args.n_cells, n_genes=args.n_genes, n_donors=16)
        t = time.perf_counter()
        write_shards(
            DeviceSyntheticSource(SyntheticAtlas(spec), args.device),
            str(shards),
            ShardSettings(shard_size=max(10_000, args.n_cells // 16), overwrite=True, progress=False),
            echo=lambda *_: None,
        )
        print(
            f"generated {args.n_cells:,} cells x {args.n_genes:,} genes as shards in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
    dataset = ShardedDataset(str(shards))
    device_name = torch.cuda.get_device_name() if args.device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"{device_name}; batch {args.batch_size}; {args.precision}; latent {args.latent_dims}; hidden {args.hidden_dim}"
    )
    rows = [
        measure("loader -> device (no model)", lambda: time_loader(dataset, args), args),
        measure(
            "train, GPU-resident, eager",
            lambda: time_training(make_trainer(dataset.n_vars, args), resident_batches(dataset, args), args, False),
            args,
        ),
    ]
    if args.compile:
        rows.append(
            measure(
                "train, GPU-resident, compiled",
                lambda: time_training(
                    make_trainer(dataset.n_vars, args, compile_model=True), resident_batches(dataset, args), args, False
                ),
                args,
            )
        )
    rows.append(
        measure(
            "train, from shards, eager",
            lambda: time_training(make_trainer(dataset.n_vars, args), shard_batches(dataset, args), args, True),
            args,
        )
    )
    rows.append(measure("embed end to end (shards -> Zarr)", lambda: time_embed(shards, work, args), args))
    syncs = syncs_per_step(dataset, args)
    resident = max(r["cells_per_s"] for r in rows if r["path"].startswith("train, GPU-resident"))
    shards_rate = next(r["cells_per_s"] for r in rows if r["path"].startswith("train, from shards"))
    embed_rate = rows[-1]["cells_per_s"]
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "n_cells": dataset.n_obs,
        "n_genes": dataset.n_vars,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "latent_dims": args.latent_dims,
        "hidden_dim": args.hidden_dim,
        "rows": rows,
        "syncs_per_train_step": syncs,
        "shards_over_resident": round(shards_rate / resident, 3),
        "goals": {
            "shards >= 0.5 x resident": shards_rate >= 0.5 * resident,
            "shards >= 430k cells/s": shards_rate >= 430_000,
            "embed >= 1M cells/s": embed_rate >= 1_000_000,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("\n| path | cells/s | seconds | GPU util % | peak device MB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['cells_per_s']:,} | {r['seconds']} | {r['gpu_util_percent'] or '-'} | {r['peak_device_mb'] or '-'} |"
        )
    print(
        f"\nsyncs per training step: {'-' if syncs is None else syncs}; from shards / resident: "
        f"{report['shards_over_resident']}; goals: "
        + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in report["goals"].items())
    )
    out = args.json or work / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"total {report['seconds']} s; table written to {out}")


if __name__ == "__main__":
    main()
