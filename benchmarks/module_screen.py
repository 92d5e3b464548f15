"""One screen run of issue 37's gene-module setting: the hierarchical model alone on a dataset of
``hierarchy_quality.py``, with HVAEConfig overrides and, optionally, gene-module partitions built
from the data, scored as that benchmark scores (kNN, within-parent kNN, silhouette, mixing).

    .venv/bin/python benchmarks/module_screen.py synthetic --seed 0 --steps 6000 \\
        --set kl_capacity=[0,3,2] --set coarse_reconstruction_weight=0 --modules 12:10 36:20 --json run.json

``--modules K:PCS ...`` (the top first): each level's partition is a k-means (K clusters) of the
genes' loadings on the first PCS principal components of up to 20k cells' standardised log
expression. This is how the rows of benchmarks/RESULTS.md ("Coarse to fine by content, continued")
were made; the pipeline does not build module partitions yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def module_partitions(adata, specs: list[tuple[int, int]], cells: int = 20_000, seed: int = 0) -> list[list[int]]:
    """One gene partition per (K, PCS) of ``specs``: k-means of the gene loadings."""
    from sklearn.cluster import KMeans

    from pipeline.data.normalize import log_normalize

    rows = np.sort(np.random.default_rng(seed).permutation(adata.n_obs)[:cells])
    x = log_normalize(adata.X[rows]).toarray().astype(np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    partitions = []
    for k, pcs in specs:
        loadings = (vt[:pcs].T * singular[:pcs]) / np.sqrt(len(x))
        partitions.append([int(m) for m in KMeans(k, n_init=4, random_state=seed).fit_predict(loadings)])
    return partitions


def main() -> None:
    import torch

    import hierarchy_quality as hq
    from hvae import HVAEConfig
    from pipeline.config import TrainConfig
    from pipeline.train import batch_codes, fit_in_memory

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(hq.SYNTHETIC) + ["pancreas", "pbmc3k"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--set", action="append", default=[], help="HVAEConfig key=value (JSON values)")
    parser.add_argument("--modules", nargs="*", default=[], help="K:PCS per coarse level, the top first")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    adata, labels, batch_key = hq.load(args.dataset)
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    if args.modules:
        specs = [tuple(int(v) for v in item.split(":")) for item in args.modules]
        overrides["gene_modules"] = module_partitions(adata, specs)
    batch_index, batch_names = batch_codes(adata.obs, batch_key)
    config = HVAEConfig(n_genes=adata.n_vars, n_batches=len(batch_names), **overrides)
    result = fit_in_memory(adata.X, config, TrainConfig(max_steps=args.steps, batch_size=256, seed=args.seed,
                                                        log_every=args.steps), batch_index)
    overrides.pop("gene_modules", None)
    run = {"dataset": args.dataset, "seed": args.seed, "steps": args.steps, "model": overrides, "modules": args.modules,
           "kl": [round(v, 3) for v in result.kl_per_level], "steps_taken": result.steps,
           "seconds": round(time.perf_counter() - started, 1)}
    run = hq.scored(run, result.level_means, adata, labels, batch_key)
    finest = labels[-1]
    print(json.dumps({"within": [round(level["knn_within"][finest], 3) for level in run["levels"]],
                      "silhouette": [round(level["silhouette"], 3) for level in run["levels"]], "kl": run["kl"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
