"""The demo, the main job end to end on generated data: a synthetic atlas with a known 3-level
hierarchy -> pre-shuffled shards -> training (Ray Train on the local CPUs, or one process) of the
hierarchical model and its flat baseline -> one embedding per level to Zarr -> the per-level table
against the flat baseline and PCA.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hvae import HVAEConfig, active_units

from .train.checkpoint import find_checkpoint, load_model
from .config import TrainConfig, load_config
from .data import ShardSettings, write_shards
from .data.sources import ShardSource, SyntheticSource
from .embed import EmbedSettings, embed
from .train.in_memory import diagnostic_kl
from .train.step import encode_in_batches
from .train.launch import train
from .evaluate.report import EvaluateSettings, evaluate_embeddings
from .data.frames import portable_anndata
from .data.synthetic import SyntheticAtlas, SyntheticAtlasSpec


FLAT = "flat VAE"
DIMS = (32, 16, 8)  # the model defaults; every level exports level 0's 32 read-out coordinates


@dataclass(frozen=True)
class DemoSettings:
    out_dir: Path = Path("outputs/demo")
    n_cells: int = 10_000
    n_genes: int = 2_000
    n_donors: int = 8
    max_steps: int = TrainConfig.model_fields["max_steps"].default
    batch_size: int = 256  # global: split over the workers
    seed: int = 0
    with_flat_baseline: bool = True
    workers: int = 2  # Ray Train workers; 0 = one process without Ray


def run_demo(settings: DemoSettings, echo=print) -> dict:
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = SyntheticAtlasSpec(
        n_cells=settings.n_cells, n_genes=settings.n_genes, n_donors=settings.n_donors, seed=settings.seed
    )
    shards = out / "shards"
    echo(
        f"[1/6] synthetic atlas: {spec.n_cells:,} cells x {spec.n_genes:,} genes, tree {spec.branching}, "
        f"{spec.n_donors} donors (stored contiguously) -> pre-shuffled shards {shards}"
    )
    write_shards(
        SyntheticSource(SyntheticAtlas(spec)),
        str(shards),
        ShardSettings(shard_size=max(1_000, settings.n_cells // 4), seed=settings.seed, overwrite=True),
        echo=echo,
    )

    def fit(latent_dims: list[int], name: str, step: str) -> Path:
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains afresh
        workers = settings.workers
        config = load_config(
            base={"data": {"path": str(shards), "batch_key": "donor_id"}},
            overrides=[
                f"model.latent_dims={latent_dims}",
                f"train.max_steps={settings.max_steps}",
                f"train.batch_size={max(1, settings.batch_size // max(1, workers))}",
                f"train.seed={settings.seed}",
                f"checkpoint.every_steps={max(1, settings.max_steps // 3)}",
                f"scaling.num_workers={workers}",
                f"run.storage_path={out / 'runs'}",
                f"run.name={name}",
                "train.log_every=50",
            ],
        )
        where = f"Ray Train, {workers} CPU workers" if workers else "one process"
        echo(
            f"[{step}] training the {len(latent_dims)}-level model {tuple(latent_dims)} for {settings.max_steps} steps ({where}) ..."
        )
        summary = train(config, echo=echo)
        echo(f"       {summary['wall_seconds']:.0f} s -> {summary['checkpoint']}")
        return run_dir

    hierarchical_run = fit(list(DIMS), "hvae", "2/6")
    width = HVAEConfig(n_genes=1, latent_dims=DIMS).representation_dims[0]  # as wide as level 0's export
    flat_run = fit([width], "flat", "3/6") if settings.with_flat_baseline else None

    echo("[4/6] embedding every cell, one array per level")
    embeddings = out / "embeddings.zarr"
    quiet = EmbedSettings(overwrite=True, progress=False)
    embed(str(hierarchical_run), {"source": str(shards)}, str(embeddings), quiet, echo=echo)
    if flat_run is not None:
        embed(str(flat_run), {"source": str(shards)}, str(out / "embeddings_flat.zarr"), quiet, echo=lambda *_: None)

    echo("[5/6] evaluating every level against the known tree (hvae-pipeline evaluate)")
    labels = list(spec.label_names)
    compare = {FLAT: str(out / "embeddings_flat.zarr")} if flat_run is not None else {}
    report = evaluate_embeddings(
        str(embeddings),
        EvaluateSettings(
            labels=tuple(labels),
            batch_key="donor_id",
            out_dir=str(out / "report"),
            compare=compare,
            pca=True,
            max_cells=settings.n_cells,
            seed=settings.seed,
            map_method="pca",
            overwrite=True,
        ),
        echo=lambda *_: None,
    )
    source = ShardSource(str(shards))
    obs, counts = source.read_obs(), source.rows(0, source.n_obs)
    donors = obs["donor_id"].cat.codes.to_numpy(np.int64)
    kl, units = {}, {}
    for name, run in (("HVAE", hierarchical_run), (FLAT, flat_run)):
        if run is not None:
            model = load_model(find_checkpoint(run))[0]
            kl[name] = diagnostic_kl(model, counts, donors if model.config.n_batches else None)
            # Each z_l's own units (the exports' columns are not units), on every cell.
            units[name] = active_units([torch.from_numpy(m) for m in encode_in_batches(model, counts, latents=True)])
    rows = [_row(result, labels, kl, units) for result in report["results"]]
    echo("[6/6] mapping cells of 2 new donors to the atlas (hvae-pipeline index + query)")
    transfer = _query_new_donors(spec, settings, out, hierarchical_run, embeddings, labels)
    summary = {
        "shards": str(shards),
        "run": str(hierarchical_run),
        "checkpoint": str(find_checkpoint(hierarchical_run)),
        "embeddings": str(embeddings),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "report": report["report"],
        "workers": settings.workers,
        "rows": rows,
        "query": transfer,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    echo("")
    echo(format_table(rows, labels))
    echo("")
    echo(format_transfer(transfer, labels))
    echo("")
    echo(
        f"shards:     {shards}\nrun:        {hierarchical_run} (metrics.jsonl, checkpoints, tensorboard/)\n"
        f"embeddings: {embeddings} (level_<l>/mean, level 0 = finest; pipeline.embed.read_embeddings)\n"
        f"report:     {report['report']} (NMI/ARI, silhouette, donor mixing, maps/)\n"
        f"summary:    {out / 'summary.json'}"
    )
    return summary


def _query_new_donors(spec, settings: DemoSettings, out: Path, run: Path, embeddings: Path, labels: list[str]) -> dict:
    """Cells of two donors the atlas has not seen (the same tree, new donor effects), mapped to the
    atlas at every level; the share of each label transferred right, per level."""
    from dataclasses import replace

    from .query import IndexSettings, build_index, query

    n_query = max(200, settings.n_cells // 10)
    donors = spec.n_donors + 2  # the generator's donors 0..n-1 are the atlas's; n and n+1 are new
    bigger = replace(spec, n_donors=donors, n_cells=n_query * donors // 2)
    generator = SyntheticAtlas(bigger)
    cells = generator.to_anndata()
    cells = cells[cells.obs["donor_id"].astype(str).isin(generator.donor_names[-2:]).to_numpy()].copy()
    cells.obs_names = [f"query_{name}" for name in cells.obs_names]
    portable_anndata(cells).write_h5ad(out / "query_cells.h5ad")
    build_index(str(embeddings), settings=IndexSettings(overwrite=True), echo=lambda *_: None)
    mapped_path = out / "query_mapped.h5ad"
    query(
        str(find_checkpoint(run)),
        str(embeddings),
        {"source": str(out / "query_cells.h5ad")},
        labels,
        str(mapped_path),
        overwrite=True,
        echo=lambda *_: None,
    )
    import anndata as ad

    mapped = ad.read_h5ad(mapped_path)
    accuracy = {
        label: [
            round(float((mapped.obs[f"{label}_level_{level}"].astype(str) == mapped.obs[label].astype(str)).mean()), 3)
            for level in range(len(DIMS))
        ]
        for label in labels
    }
    return {
        "cells": int(mapped.n_obs),
        "out": str(mapped_path),
        "accuracy": accuracy,
        "unlike": [int(mapped.obs[f"unlike_level_{level}"].sum()) for level in range(len(DIMS))],
    }


def format_transfer(transfer: dict, labels: list[str]) -> str:
    head = f"labels transferred to {transfer['cells']:,} cells of 2 new donors (15-neighbour vote; share right)"
    lines = [head, "| level | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for level in reversed(range(len(DIMS))):
        name = {len(DIMS) - 1: f"level {level} (top)", 0: "level 0 (finest)"}.get(level, f"level {level}")
        lines.append(
            f"| {name} | " + " | ".join(f"{transfer['accuracy'][label][level]:.3f}" for label in labels) + " |"
        )
    return "\n".join(lines) + f"\nquery result: {transfer['out']} (obs <label>_level_<l>, confidence, unlike_level_<l>)"


def _row(result: dict, labels: list[str], kl: dict, units: dict) -> dict:
    """One table row from an evaluate result, named as `evaluate` names it."""
    name, level = result["representation"], result["level"]
    model = FLAT if name.startswith(FLAT) else "HVAE" if level is not None else None
    return {
        "representation": name,
        "dim": result["dim"],
        "kl": None if model is None else round(kl[model][level], 2),
        "active_units": None if model is None else units[model][level],
        "batch_mixing": round(result["batch_mixing"], 3),
        **{label: round(result["labels"][label]["knn_accuracy"], 3) for label in labels},
        **{
            f"{label} within {parent}": round(result["labels"][label]["knn_within_parent"], 3)
            for parent, label in zip(labels, labels[1:])
        },
    }


def format_table(rows: list[dict], labels: list[str]) -> str:
    """A Markdown table: representation, dim, KL, active units, kNN accuracy per label and within
    each label's parent (where the rows have it), and donor mixing when the rows have it
    (benchmarks without donors leave it out)."""
    mixing = any("batch_mixing" in row for row in rows)
    within = [f"{label} within {parent}" for parent, label in zip(labels, labels[1:])]
    within = [column for column in within if any(column in row for row in rows)]
    header = ["representation", "dim", "KL (nats)", "active units"] + [f"kNN {label}" for label in labels + within]
    header += ["donor mixing"] if mixing else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = (
            [row["representation"], row["dim"], row["kl"], row["active_units"]]
            + [row[label] for label in labels]
            + [row.get(column) for column in within]
        )
        values += [row.get("batch_mixing")] if mixing else []
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines)


__all__ = ["DemoSettings", "run_demo", "format_table"]
