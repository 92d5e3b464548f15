"""The demo: a synthetic atlas with a known 3-level hierarchy, the hierarchical model against
its flat baseline and PCA, one embedding per level written out, and the per-level table.

This runs in one process on the CPU. The Ray-trained, sharded, Zarr-embedding version of the
same job replaces the in-memory steps as those stages land (training and inference issues).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import torch

from hvae import HVAEConfig

from .evaluation import evaluate_levels, pca_embedding
from .fit import FitResult, batch_codes, fit_in_memory
from .synthetic import SyntheticAtlasSpec, write_synthetic_atlas
from .training import StepSettings


@dataclass(frozen=True)
class DemoSettings:
    out_dir: Path = Path("outputs/demo")
    n_cells: int = 10_000
    n_genes: int = 2_000
    n_donors: int = 8
    max_steps: int = 3_000
    batch_size: int = 256
    seed: int = 0
    with_flat_baseline: bool = True


def run_demo(settings: DemoSettings, echo=print) -> dict:
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = SyntheticAtlasSpec(
        n_cells=settings.n_cells, n_genes=settings.n_genes, n_donors=settings.n_donors, seed=settings.seed
    )
    atlas_path = out / "atlas.zarr"
    echo(f"[1/4] synthetic atlas: {spec.n_cells:,} cells x {spec.n_genes:,} genes, tree {spec.branching}, "
         f"{spec.n_donors} donors -> {atlas_path}")
    write_synthetic_atlas(spec, atlas_path)
    adata = ad.read_zarr(atlas_path)  # the file just written, not a second generation
    labels = list(spec.label_names)
    donors, donor_names = batch_codes(adata.obs, "donor_id")
    step_settings = StepSettings(kl_warmup_steps=settings.max_steps // 3)

    def train(latent_dims: tuple[int, ...], title: str) -> FitResult:
        config = HVAEConfig(n_genes=spec.n_genes, latent_dims=latent_dims, n_batches=len(donor_names))
        echo(f"[{title}] training {len(latent_dims)}-level model {latent_dims} for {settings.max_steps} steps on CPU ...")
        result = fit_in_memory(
            adata.X, config, step_settings, settings.max_steps, settings.batch_size, donors,
            seed=settings.seed, obs=adata.obs, label_columns=labels, progress=True,
        )
        cells_per_second = settings.max_steps * settings.batch_size / result.seconds
        echo(f"       {result.seconds:.0f} s ({cells_per_second:,.0f} cells/s)")
        return result

    hierarchical = train((32, 16, 8), "2/4")
    flat = train((32,), "3/4") if settings.with_flat_baseline else None
    pca_scores = evaluate_levels([pca_embedding(adata.X)], adata.obs, labels)[0]

    echo("[4/4] writing embeddings and the model")
    for level, means in enumerate(hierarchical.level_means):
        adata.obsm[f"X_hvae_level_{level}"] = means
    adata.uns["provenance"] = json.dumps({"atlas": json.loads(adata.uns["provenance"]), "created": time.time()})
    embeddings_path = out / "embeddings.h5ad"
    adata.write_h5ad(embeddings_path)
    model_path = out / "model.pt"
    torch.save(
        {
            "model_config": hierarchical.model.config.to_dict(),
            "state_dict": hierarchical.model.state_dict(),
            "feature_ids": list(adata.var["feature_id"]),
            "batch_categories": donor_names,
            "train_step": hierarchical.trainer.step_count,
        },
        model_path,
    )

    rows = _table_rows(hierarchical, flat, pca_scores, labels)
    summary = {
        "atlas": str(atlas_path),
        "embeddings": str(embeddings_path),
        "model": str(model_path),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo("")
    echo(format_table(rows, labels))
    echo("")
    echo(f"atlas:      {atlas_path}\nembeddings: {embeddings_path} (obsm['X_hvae_level_<l>'], level 0 = finest)\n"
         f"model:      {model_path}\nsummary:    {out / 'summary.json'}")
    return summary


def _table_rows(hierarchical: FitResult, flat: FitResult | None, pca_scores: dict, labels: list[str]) -> list[dict]:
    rows = []
    dims = hierarchical.model.config.latent_dims
    for level in reversed(range(len(dims))):
        rows.append({
            "representation": f"HVAE level {level}" + (" (top)" if level == len(dims) - 1 else " (finest)" if level == 0 else ""),
            "dim": dims[level],
            "kl": round(hierarchical.kl_per_level[level], 2),
            "active_units": hierarchical.active_units[level],
            **{label: round(hierarchical.knn[level][label], 3) for label in labels},
        })
    if flat is not None:
        rows.append({"representation": "flat VAE (baseline)", "dim": flat.model.config.latent_dims[0],
                     "kl": round(flat.kl_per_level[0], 2), "active_units": flat.active_units[0],
                     **{label: round(flat.knn[0][label], 3) for label in labels}})
    rows.append({"representation": "PCA (50 comps)", "dim": 50, "kl": None, "active_units": None,
                 **{label: round(pca_scores[label], 3) for label in labels}})
    return rows


def format_table(rows: list[dict], labels: list[str]) -> str:
    """A Markdown table: representation, dim, KL, active units, kNN accuracy per label."""
    header = ["representation", "dim", "KL (nats)", "active units"] + [f"kNN {label}" for label in labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row["representation"], row["dim"], row["kl"], row["active_units"]] + [row[label] for label in labels]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines)


__all__ = ["DemoSettings", "run_demo", "format_table"]
