"""One model variant on the synthetic atlas, as a JSON line (the ablations in RESULTS.md).

    python benchmarks/ablation.py NAME MODEL_JSON STEP_JSON STEPS BATCH_SIZE
    python benchmarks/ablation.py bal_c025 '{"coarse_reconstruction_weight": 0.25}' '{"kl_warmup_steps": 1000}' 3000 256

MODEL_JSON overrides HVAEConfig fields, STEP_JSON StepSettings fields. Runs on 1 thread so
that two variants can run side by side on a 2-core machine.
"""

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvae import HVAEConfig  # noqa: E402
from pipeline.fit import batch_codes, fit_in_memory  # noqa: E402
from pipeline.synthetic import SyntheticAtlas, SyntheticAtlasSpec  # noqa: E402
from pipeline.training import StepSettings  # noqa: E402

LABELS = ["lineage", "cell_type", "subtype"]


def main() -> None:
    name, model_overrides, step_overrides = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    steps, batch_size = int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    adata = SyntheticAtlas(SyntheticAtlasSpec(n_cells=10_000, n_genes=2_000)).to_anndata()
    donors, names = batch_codes(adata.obs, "donor_id")
    config = HVAEConfig(n_genes=2_000, n_batches=len(names), **model_overrides)
    start = time.time()
    result = fit_in_memory(adata.X, config, StepSettings(**step_overrides), steps, batch_size, donors,
                           obs=adata.obs, label_columns=LABELS)
    print(json.dumps({
        "name": name, "time": round(time.time() - start), "nelbo": round(result.history[-1]["negative_elbo"], 1),
        # KL as logged at the last training step (the EMA model's is in result.kl_per_level).
        "KL": [round(result.history[-1][f"kl_level_{level}"], 2) for level in range(config.n_levels)],
        "AU": result.active_units,
        "knn": [{label: round(v, 3) for label, v in level.items()} for level in result.knn],
    }))


if __name__ == "__main__":
    main()
