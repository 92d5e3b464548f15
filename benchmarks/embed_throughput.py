"""Embedding throughput: cells/s of `embed` end to end (read, encode, write Zarr), next to its
parts measured alone on the same cells and model.

    .venv/bin/python benchmarks/embed_throughput.py --simulate 200000 --n-genes 2000
    .venv/bin/python benchmarks/embed_throughput.py --source SHARDS_OR_H5AD [--device cuda] [--ray-workers 2]

Stages: "read" (the source's rows for each chunk, count checks and gene alignment, no model),
"encode" (the model's encode on dense device-resident batches: the compute ceiling), and "embed"
(the command's local path: reads one chunk ahead in a thread, encodes, writes every level to
Zarr, marks the chunk done); the ratio of "embed" to "encode" is printed against its goal (>= 0.9).
With --logvar, also encode and embed with the posterior variances (their cost against the means).
With --ray-workers N, also `embed --workers N` (N Ray actors on this machine). The model is a freshly initialised 3-level HVAE written as a checkpoint (throughput does
not depend on training). Single process, no Ray unless asked: runs on the GPU machine as it is.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvae import HVAEConfig, HierarchicalVAE, fit_gene_modules  # noqa: E402
from pipeline.train.checkpoint import save_checkpoint  # noqa: E402
from pipeline.data import GeneAlignment, check_counts, open_source  # noqa: E402
from pipeline.embed import EmbedSettings, embed  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.data import densify  # noqa: E402
from pipeline.train.step import Trainer  # noqa: E402

GOAL = 0.9  # embed end to end at >= 0.9x the model's in-memory encode of the same cells


def write_model(directory: Path, feature_ids: list[str], hidden_dim: int) -> None:
    torch.manual_seed(0)
    config = HVAEConfig(n_genes=len(feature_ids), latent_dims=(32, 16, 8), hidden_dim=hidden_dim)
    config = fit_gene_modules(
        config, torch.poisson(torch.full((1024, config.n_genes), 2.0))
    )  # modules of unstructured counts: the same cost as the data's
    trainer = Trainer(HierarchicalVAE(config), TrainConfig())
    save_checkpoint(directory, trainer, config, "{}\n", {"step": 0}, feature_ids, None, [])


def read_rate(source, chunk_rows: int) -> float:
    alignment = GeneAlignment(source.feature_ids, source.feature_ids)
    ids = np.asarray(source.read_obs().index.astype(str))
    started = time.perf_counter()
    for lo in range(0, source.n_obs, chunk_rows):
        counts = source.rows(lo, min(source.n_obs, lo + chunk_rows))
        check_counts(counts, source.uri, ids[lo : lo + chunk_rows], source.feature_ids)
        alignment.apply(counts)
    return source.n_obs / (time.perf_counter() - started)


@torch.no_grad()
def encode_rate(
    directory: Path, source, batch_size: int, device: str, cells: int = 65_536, logvar: bool = False
) -> float:
    from pipeline.train.checkpoint import load_model

    model = load_model(directory)[0].to(device).eval()
    batch = densify(source.rows(0, min(batch_size, source.n_obs)), torch.device(device))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    with autocast:
        model.encode(batch, return_logvar=logvar)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started, done = time.perf_counter(), 0
        while done < cells:
            result = model.encode(batch, return_logvar=logvar)
            [m.float().cpu() for part in (result if logvar else (result,)) for m in part]
            done += batch.shape[0]
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="shards directory, h5ad, AnnData-Zarr or SOMA")
    parser.add_argument("--simulate", type=int, default=None, help="write this many synthetic cells as shards first")
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--chunk-rows", type=int, default=16_384)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ray-workers", type=int, default=0)
    parser.add_argument("--logvar", action="store_true", help="also time encode and embed with --logvar")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.simulate:
        from pipeline.data import ShardSettings, write_shards
        from pipeline.data.sources import SyntheticSource
        from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

        shards = args.work / f"embed_{args.simulate}_{args.n_genes}"
        if not (shards / "manifest.json").exists():
            atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=args.simulate, n_genes=args.n_genes, n_donors=16))
            write_shards(SyntheticSource(atlas), str(shards), ShardSettings(overwrite=True))
        args.source = str(shards)
    if not args.source:
        parser.error("give --source or --simulate N")
    work = args.work / "embed_bench"
    shutil.rmtree(work, ignore_errors=True)
    source = open_source(args.source)
    write_model(work / "checkpoint", list(source.feature_ids), args.hidden_dim)
    rows = [
        ("read (rows, checks, alignment)", read_rate(source, args.chunk_rows)),
        (
            f"encode ({args.device}, resident batches)",
            encode_rate(work / "checkpoint", source, args.batch_size, args.device),
        ),
    ]
    settings = EmbedSettings(batch_size=args.batch_size, chunk_rows=args.chunk_rows, progress=False, device=args.device)
    result = embed(
        str(work / "checkpoint"), {"source": args.source}, str(work / "local.zarr"), settings, echo=lambda *_: None
    )
    rows.append(("embed end to end (one process)", result["cells"] / result["seconds"]))
    if args.logvar:
        logvar_ceiling = encode_rate(
            work / "checkpoint", source, args.batch_size, args.device, cells=16_384, logvar=True
        )
        settings.logvar = True
        result = embed(
            str(work / "checkpoint"), {"source": args.source}, str(work / "logvar.zarr"), settings, echo=lambda *_: None
        )
        settings.logvar = False
        rows += [
            ("encode with --logvar (resident batches)", logvar_ceiling),
            ("embed --logvar end to end (one process)", result["cells"] / result["seconds"]),
        ]
    if args.ray_workers:
        import ray

        ray.init(num_cpus=max(2, args.ray_workers), include_dashboard=False, log_to_driver=False)
        settings.workers = args.ray_workers
        result = embed(
            str(work / "checkpoint"), {"source": args.source}, str(work / "ray.zarr"), settings, echo=lambda *_: None
        )
        rows.append((f"embed end to end ({args.ray_workers} Ray actors)", result["cells"] / result["seconds"]))
        ray.shutdown()
    source.close()
    ceiling = rows[1][1]
    print(
        f"\n{source.n_obs:,} cells x {len(source.feature_ids):,} genes from {args.source}; batch {args.batch_size}, "
        f"chunks of {args.chunk_rows:,}; {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + "\n"
    )
    print("| stage | cells/s | / encode ceiling |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / ceiling:.2f} |")
    ratio = rows[2][1] / ceiling
    print(f"\nembed end to end / encode ceiling: {ratio:.2f} (goal >= {GOAL}: {'PASS' if ratio >= GOAL else 'FAIL'})")
    if args.logvar:
        print(
            f"--logvar costs {ceiling / rows[-2][1]:.1f}x the time of the means (encode); embed --logvar / its "
            f"ceiling: {rows[-1][1] / rows[-2][1]:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"cells": source.n_obs, "device": args.device, "rows": rows, "ratio": ratio}, indent=1)
        )


if __name__ == "__main__":
    main()
