"""One screen run of a model setting: the hierarchical model alone on a dataset of
``hierarchy_quality.py``, with HVAEConfig overrides, scored as that benchmark scores (kNN,
within-parent kNN, silhouette, mixing), one thread.

    .venv/bin/python benchmarks/module_screen.py synthetic --seed 0 --steps 6000 \\
        --set kl_capacity=[0,3,2] --set coarse_reconstruction_weight=0 \\
        --set 'module_levels=[[12,10],[36,20]]' --json run.json

``module_levels`` makes ``pipeline.train.fit_in_memory`` build the gene modules from the data
(``hvae.modules``) as the pipeline does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    import torch

    import hierarchy_quality as hq
    from hvae import HVAEConfig
    from pipeline.config import TrainConfig
    from pipeline.train import batch_codes, fit_in_memory, with_gene_modules

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(hq.SYNTHETIC) + ["pancreas", "pbmc3k"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--set", action="append", default=[], help="HVAEConfig key=value (JSON values)")
    parser.add_argument(
        "--module-seed",
        type=int,
        default=None,
        help="build the gene modules with this k-means / projection seed (default: the pipeline's, 0)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    adata, labels, batch_key = hq.load(args.dataset)
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    batch_index, batch_names = batch_codes(adata.obs, batch_key)
    config = HVAEConfig(n_genes=adata.n_vars, n_batches=len(batch_names), **overrides)
    if args.module_seed is not None:  # the pipeline's cell sample, another seed for the partition
        config = with_gene_modules(config, adata.X, seed=args.module_seed)
    result = fit_in_memory(
        adata.X,
        config,
        TrainConfig(max_steps=args.steps, batch_size=256, seed=args.seed, log_every=args.steps),
        batch_index,
    )
    run = {
        "dataset": args.dataset,
        "seed": args.seed,
        "steps": args.steps,
        "model": overrides,
        "module_seed": args.module_seed,
        "kl": [round(v, 3) for v in result.kl_per_level],
        "steps_taken": result.steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    run = hq.scored(run, result.level_means, adata, labels, batch_key)
    finest = labels[-1]
    print(
        json.dumps(
            {
                "within": [round(level["knn_within"][finest], 3) for level in run["levels"]],
                "silhouette": [round(level["silhouette"], 3) for level in run["levels"]],
                "kl": run["kl"],
            }
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
