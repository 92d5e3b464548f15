"""Is each level the best representation at its granularity? Levels x labels, next to PCA and the
flat model, on real data and two synthetic generator settings, with the five checks as PASS/FAIL.

    python benchmarks/hierarchy_quality.py                                   # 4 datasets x 3 seeds
    python benchmarks/hierarchy_quality.py --datasets pbmc3k --seeds 0 --set dropout=0.2
    python benchmarks/hierarchy_quality.py --datasets synthetic_200k --seeds 0   # the scale check
    python benchmarks/hierarchy_quality.py --save-models runs/ --json q.json    # keep the trained models
    python benchmarks/hierarchy_quality.py --rescore runs/                       # score them again, no training
    python benchmarks/hierarchy_quality.py --datasets pancreas pbmc3k --scvi-python scvi-venv/bin/python

Datasets (labels coarsest -> finest):
- `synthetic`: the project's atlas as the demo and tests draw it (3x3x3 tree, 10k cells,
  2,000 genes, 8 donors);
- `synthetic_wide`: another shape (4x3x2 tree, weaker type and subtype programs, 30k cells,
  16 donors with stronger effects), so that defaults are not tuned to one generator;
- `synthetic_200k`: the project's atlas at 200k cells (6,000 steps of 256 cells: 7.7 epochs),
  scored on a 50k-cell subsample;
- `pancreas` (1,000 cells, coarse -> fine) and `pbmc3k` (2,638 labelled cells, lineage -> coarse
  -> fine) from ../shared/data, reduced to 2,000 highly variable genes.

Every run trains the model defaults (plus `--set` overrides) and the flat model of level 0's
width through `pipeline.train.fit_in_memory`, one thread per run, `--jobs` runs at a time. Medians
over seeds are printed per dataset: kNN accuracy (15 neighbours, 5-fold) per label, NMI / ARI
(k-means) on the finest labels, label silhouette on the coarsest, donor mixing (globally and, in
brackets, within the finest labels: check 5 reads the latter), KL per level and active units;
kNN within the parent label beside its chance level (each parent's majority child); then the nine
checks of `pipeline.evaluate.hierarchy` on the medians, each followed by the number of
seeds on which it passes alone (each seed against the flat model of the same seed): a median's
verdict that one seed of three shares is not settled. `--json` keeps every run.

`--save-models DIR` keeps each trained model; `--rescore DIR` scores those models again with the
current code (a change to what the levels export, or to a metric, measured on the same weights).
`--scvi-python PY` adds scvi-tools' SCVI with its defaults, trained in the Python ``PY`` (one with
scvi-tools installed) by `peers/scvi_embed_peer.py` on the same cells and genes, as a reference row
that is not part of the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

SYNTHETIC = {
    "synthetic": dict(n_cells=10_000, n_genes=2_000, n_donors=8),
    "synthetic_wide": dict(
        n_cells=30_000,
        n_genes=2_000,
        n_donors=16,
        branching=(4, 3, 2),
        effect_sd=(1.5, 1.0, 0.7),
        program_fraction=(0.08, 0.04, 0.03),
        donor_effect_sd=0.5,
        seed=7,
    ),
    "synthetic_200k": dict(n_cells=200_000, n_genes=2_000, n_donors=8),
}
DATASETS = ("synthetic", "synthetic_wide", "pancreas", "pbmc3k")
EVAL_CELLS = 50_000


def load(name: str):
    """(AnnData with raw counts, label columns coarsest -> finest, batch key or None)."""
    import anndata as ad

    from pipeline.data.genes import GeneStatistics
    from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

    if name in SYNTHETIC:
        spec = SyntheticAtlasSpec(**SYNTHETIC[name])
        return SyntheticAtlas(spec).to_anndata(), list(spec.label_names), "donor_id"
    if name == "pancreas":
        adata, labels = ad.read_h5ad(DATA / "mouse_pancreas_sub1000_raw.h5ad"), ["cell_type_coarse", "cell_type_fine"]
    elif name == "pbmc3k":
        adata = ad.read_h5ad(DATA / "pbmc3k_raw_seurat_annotations.h5ad")
        adata = adata[adata.obs["cell_type_fine"].notna()].copy()
        labels = ["lineage", "cell_type_coarse", "cell_type_fine"]
    else:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(list(SYNTHETIC) + ['pancreas', 'pbmc3k'])})")
    stats = GeneStatistics(adata.n_vars)
    stats.update(adata.X)
    adata = adata[:, stats.highly_variable(2000)].copy()
    adata.X = adata.X.tocsr().astype(np.float32)
    return adata, labels, None


def score(embedding: np.ndarray, obs, labels: list[str], batch_key: str | None, rows: np.ndarray) -> dict:
    """kNN per label, NMI/ARI on the finest, silhouette on the coarsest, batch mixing: on ``rows``."""
    from pipeline.evaluate import (
        batch_mixing,
        cluster_agreement,
        knn_accuracy,
        knn_across,
        knn_within,
        silhouette_label,
    )

    embedding, obs = embedding[rows], obs.iloc[rows]
    result = {
        "knn": {label: knn_accuracy(embedding, obs[label].to_numpy()) for label in labels},
        "knn_within": {
            label: knn_within(embedding, obs[label].to_numpy(), obs[parent].to_numpy())
            for parent, label in zip(labels, labels[1:])
        },
        "silhouette": silhouette_label(embedding, obs[labels[0]].to_numpy()),
        **cluster_agreement(embedding, obs[labels[-1]].to_numpy()),
    }
    if batch_key:
        batches = obs[batch_key].to_numpy()
        result["mixing"] = batch_mixing(embedding, batches)
        result["mixing_within"] = batch_mixing(embedding, batches, within=obs[labels[-1]].to_numpy())
        # the finest label with neighbours from other donors only (no reading it off the donor)
        fine = obs[labels[-1]].to_numpy()
        result["knn_across"] = {labels[-1]: knn_across(embedding, fine, batches)}
        if len(labels) >= 2:
            result["knn_within_across"] = {labels[-1]: knn_across(embedding, fine, batches, obs[labels[-2]].to_numpy())}
    return result


def eval_rows(n_obs: int) -> np.ndarray:
    return np.sort(np.random.default_rng(0).permutation(n_obs)[:EVAL_CELLS])


def run_model(task: dict) -> dict:
    """One training run (a pool job): ``task`` names the dataset, seed, kind and settings."""
    import torch

    torch.set_num_threads(1)
    from hvae import HVAEConfig
    from pipeline.config import TrainConfig
    from pipeline.train import batch_codes, fit_in_memory

    adata, labels, batch_key = load(task["dataset"])
    batch_index, batch_names = batch_codes(adata.obs, batch_key)
    model = dict(task["model"])
    config = HVAEConfig(n_genes=adata.n_vars, n_batches=len(batch_names), **model)
    train = TrainConfig(
        max_steps=task["steps"], batch_size=task["batch_size"], seed=task["seed"], log_every=task["steps"]
    )
    result = fit_in_memory(adata.X, config, train, batch_index)
    run = {
        **task,
        "seconds": round(result.seconds, 1),
        "kl": [round(v, 3) for v in result.kl_per_level],
        "active_units": result.active_units,
        "steps_taken": result.steps,
        "best_step": result.best_step,
    }
    run.pop("save_models", None)
    if task.get("save_models"):
        path = Path(task["save_models"]) / f"{task['dataset']}_{task['kind']}_seed{task['seed']}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"run": run, "model_config": result.model.config.to_dict(), "state": result.model.state_dict()}, path
        )
    return scored(run, result.level_means, adata, labels, batch_key)


def scored(run: dict, level_means: list[np.ndarray], adata, labels: list[str], batch_key: str | None) -> dict:
    """A run with the width and the scores of each representation it exports (on ``eval_rows``)."""
    rows = eval_rows(adata.n_obs)
    return {
        **run,
        "dims": [int(m.shape[1]) for m in level_means],
        "levels": [score(m, adata.obs, labels, batch_key, rows) for m in level_means],
    }


def rescore_model(path: str) -> dict:
    """Score a model kept by ``--save-models`` with the current export (``model.encode``):
    the same weights, no training (a pool job)."""
    import torch

    torch.set_num_threads(1)
    from hvae import HierarchicalVAE, HVAEConfig
    from pipeline.train import encode_in_batches

    saved = torch.load(path, weights_only=True)
    model = HierarchicalVAE(HVAEConfig.from_dict(saved["model_config"]))
    try:
        model.load_state_dict(saved["state"])
    except RuntimeError as error:  # a state-dict change since the model was saved
        raise ValueError(
            f"{path}: saved by a model of another layout; --rescore reads models of the current "
            f"code only, retrain it ({str(error).splitlines()[0]} ...)"
        ) from None
    adata, labels, batch_key = load(saved["run"]["dataset"])
    return scored(saved["run"], encode_in_batches(model, adata.X), adata, labels, batch_key)


def scvi_peer(python: str, adata, batch_key: str | None, seed: int = 0, query=None):
    """(its JSON line, the latent of ``adata``, the latent of ``query`` or None): scvi-tools SCVI
    with its defaults trained on ``adata`` by ``peers/scvi_embed_peer.py`` in the Python ``python``
    (one with scvi-tools installed), ``query`` mapped into it (``--query``)."""
    import subprocess
    import tempfile

    def written(cells, path: Path) -> str:
        cells = cells.copy()
        cells.obs = cells.obs[[batch_key] if batch_key else []].copy()
        cells.write_h5ad(path)
        return str(path)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        command = [python, str(ROOT / "benchmarks" / "peers" / "scvi_embed_peer.py"), "--seed", str(seed)]
        command += ["--h5ad", written(adata, tmp / "cells.h5ad"), "--out", str(tmp / "cells.npy")]
        if query is not None:
            command += ["--query", written(query, tmp / "query.h5ad"), "--query-out", str(tmp / "query.npy")]
        command += ["--batch-key", batch_key] if batch_key else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"scvi-tools peer failed (seed {seed}):\n{done.stderr[-2000:]}")
        latent = np.load(tmp / "cells.npy")
        query_latent = np.load(tmp / "query.npy") if query is not None else None
    return json.loads(done.stdout.strip().splitlines()[-1]), latent, query_latent


def run_scvi(task: dict) -> dict:
    """scvi-tools SCVI with its defaults on the same cells and genes (a pool job): the peer row,
    trained in the Python of ``--scvi-python``."""
    adata, labels, batch_key = load(task["dataset"])
    try:
        info, latent, _ = scvi_peer(task["python"], adata, batch_key, task["seed"])
    except RuntimeError as error:
        raise RuntimeError(f"{task['dataset']}: {error}") from None
    run = {
        "dataset": task["dataset"],
        "kind": "scvi",
        "seed": task["seed"],
        "version": info["version"],
        "seconds": info["seconds"],
        "epochs": info["epochs"],
    }
    return scored(run, [latent], adata, labels, batch_key)


def run_pca(dataset: str) -> dict:
    from pipeline.evaluate import majority_within, pca_embedding

    adata, labels, batch_key = load(dataset)
    rows = eval_rows(adata.n_obs)
    obs = adata.obs.iloc[rows]
    chance = {
        label: majority_within(obs[label].to_numpy(), obs[parent].to_numpy())
        for parent, label in zip(labels, labels[1:])
    }
    return {
        "dataset": dataset,
        "kind": "pca",
        "chance_within": chance,
        "levels": [score(pca_embedding(adata.X[rows]), obs, labels, batch_key, np.arange(len(rows)))],
    }


def median_of(runs: list[dict], level: int) -> dict:
    """The median over seeds of every metric of one level."""
    first = runs[0]["levels"][level]
    out = {
        key: {label: statistics.median(r["levels"][level][key][label] for r in runs) for label in first[key]}
        for key in ("knn", "knn_within", "knn_across", "knn_within_across")
        if key in first
    }
    if "kl" in runs[0]:
        out["kl"] = statistics.median(r["kl"][level] for r in runs)
    for key in ("silhouette", "nmi", "ari", "mixing", "mixing_within"):
        if key in first:
            out[key] = statistics.median(r["levels"][level][key] for r in runs)
    return out


def table(
    dataset: str, labels: list[str], hvae: list[dict], flat: list[dict], pca: dict, scvi: list[dict] = ()
) -> tuple[str, list]:
    from pipeline.evaluate.hierarchy import hierarchy_checks

    n_levels = len(hvae[0]["levels"])
    levels = [median_of(hvae, level) for level in range(n_levels)]
    flat_median, pca_scores = median_of(flat, 0), pca["levels"][0]
    mixing = "mixing" in levels[0]
    pairs = list(zip(labels, labels[1:]))
    header = (
        ["representation", "dim", "KL (nats)", "active units"]
        + [f"kNN {label}" for label in labels]
        + [f"kNN {label} within {parent}" for parent, label in pairs]
        + [f"NMI / ARI {labels[-1]}", f"silhouette {labels[0]}"]
        + ([f"donor mixing (within {labels[-1]})"] if mixing else [])
    )
    across = all("knn_across" in scores for scores in (*levels, flat_median, pca_scores))
    if across:  # neighbours from other donors only: nothing read off the donor
        header.append(f"kNN {labels[-1]} across donors (within {labels[-2]})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(name, dim, kl, units, scores):
        cells = [name, dim, kl, units] + [f"{scores['knn'][label]:.3f}" for label in labels]
        cells += [f"{scores['knn_within'][label]:.3f}" if "knn_within" in scores else "-" for _, label in pairs]
        cells += [f"{scores['nmi']:.3f} / {scores['ari']:.3f}", f"{scores['silhouette']:.3f}"]
        cells += [f"{scores['mixing']:.3f} ({scores['mixing_within']:.3f})"] if mixing else []
        if across:
            fine = labels[-1]
            known = "knn_across" in scores  # a peer scored before the column was: "-"
            cells.append(
                f"{scores['knn_across'][fine]:.3f} ({scores['knn_within_across'][fine]:.3f})" if known else "-"
            )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    for level in reversed(range(n_levels)):
        name = f"HVAE level {level}" + (" (top)" if level == n_levels - 1 else " (finest)" if level == 0 else "")
        kl = statistics.median(r["kl"][level] for r in hvae)
        units = statistics.median(r["active_units"][level] for r in hvae)
        row(name, hvae[0]["dims"][level], f"{kl:.2f}", f"{units:g}", levels[level])
    row(
        f"flat VAE {flat[0]['dims'][0]}-d",
        flat[0]["dims"][0],
        f"{statistics.median(r['kl'][0] for r in flat):.2f}",
        f"{statistics.median(r['active_units'][0] for r in flat):g}",
        flat_median,
    )
    row("PCA (50 comps)", 50, "-", "-", pca_scores)
    chance = pca.get("chance_within")
    if chance:  # the chance level of the within-parent columns
        lines.append(
            "| "
            + " | ".join(
                ["chance (each parent's majority child)", "-", "-", "-"]
                + ["-"] * len(labels)
                + [f"{chance[label]:.3f}" for _, label in pairs]
                + ["-", "-"]
                + (["-"] if mixing else [])
                + (["-"] if across else [])
            )
            + " |"
        )
    if scvi:  # the peer, for reference: not part of the checks
        row(
            f"scVI {scvi[0]['dims'][0]}-d (scvi-tools {scvi[0]['version']}, defaults; {len(scvi)} seeds)",
            scvi[0]["dims"][0],
            "-",
            "-",
            median_of(list(scvi), 0),
        )
    kind = "synthetic" if dataset in SYNTHETIC else "real"
    checks = hierarchy_checks(levels, flat_median, pca_scores, labels, kind=kind, chance=chance)
    alone = seeds_passing(hvae, flat, flat_median, pca_scores, labels, kind)
    seeds = sorted(r["seed"] for r in hvae)
    seconds = statistics.median(r["seconds"] for r in hvae)
    verdicts = [f"{c.line()}  [alone: {len(alone[c.number])} of {len(seeds)} seeds pass]" for c in checks]
    text = (
        f"\n### {dataset}: medians over seeds {seeds}, {hvae[0]['steps']} steps of {hvae[0]['batch_size']} cells "
        f"(HVAE {seconds:.0f} s a run)\n\n" + "\n".join(lines) + "\n\n" + "\n".join(verdicts)
    )
    return text, [{**c.__dict__, "seeds_passing": alone[c.number]} for c in checks]


def seeds_passing(
    hvae: list[dict], flat: list[dict], flat_median: dict, pca: dict, labels: list[str], kind: str = "synthetic"
) -> dict:
    """{check number: the seeds on which that check passes alone}: each seed's levels against the flat
    model of the same seed (the flats' median where that seed has none). How far a median's verdict
    is the seeds': a check that passes on the medians but on one seed of three is not settled."""
    from pipeline.evaluate.hierarchy import hierarchy_checks

    flat_by_seed = {r["seed"]: r["levels"][0] for r in flat}
    passing: dict[int, list[int]] = {}
    for run in sorted(hvae, key=lambda r: r["seed"]):
        levels = [{**scores, "kl": kl} for scores, kl in zip(run["levels"], run["kl"], strict=True)]
        for check in hierarchy_checks(levels, flat_by_seed.get(run["seed"], flat_median), pca, labels, kind=kind):
            passing.setdefault(check.number, [])
            if check.passed:
                passing[check.number].append(run["seed"])
    return passing


def parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time, one thread each")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an HVAEConfig field for the hierarchical model (repeatable), e.g. latent_dims=[64,32,16]",
    )
    parser.add_argument("--json", type=Path, help="write every run and the checks here")
    parser.add_argument(
        "--save-models",
        type=Path,
        metavar="DIR",
        help="keep every trained model here (DATASET_KIND_seedN.pt) for --rescore",
    )
    parser.add_argument(
        "--scvi-python",
        metavar="PY",
        help="also train scvi-tools SCVI (its defaults) on every dataset and seed, in this Python "
        "(one with scvi-tools installed): a reference row, not part of the checks",
    )
    parser.add_argument(
        "--rescore",
        type=Path,
        metavar="DIR",
        help="train nothing: score the models kept in DIR by --save-models with the current "
        "code's export (a change to what the levels export, measured on the same weights)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="train nothing: the tables and checks of the runs in these --json files together "
        "(e.g. seeds run on different days)",
    )
    args = parser.parse_args()
    if args.from_json:
        reports = [json.loads(path.read_text()) for path in args.from_json]
        for path, report in zip(args.from_json, reports):
            missing = [key for key in ("model", "steps", "runs", "pca") if key not in report]
            if missing:
                parser.error(f"--from-json: {path} is not a --json report of this benchmark (no {', '.join(missing)})")
        runs = [run for report in reports for run in report["runs"]]
        pcas = {dataset: pca for report in reports for dataset, pca in report["pca"].items()}
        print(f"runs of {', '.join(map(str, args.from_json))}; model {reports[0]['model'] or 'defaults'}")
        summarise(sorted(pcas), runs, pcas, reports[0]["model"], reports[0]["steps"], args.json, time.time())
        return
    if args.rescore:
        paths = sorted(str(p) for p in args.rescore.glob("*.pt"))
        if not paths:
            parser.error(f"--rescore: no saved models (*.pt) in {args.rescore}")
        started = time.time()
        with ProcessPoolExecutor(args.jobs) as pool:
            try:
                runs = list(pool.map(rescore_model, paths))
            except ValueError as error:  # a model of another layout, named by rescore_model
                parser.error(f"--rescore: {error}")
            datasets = sorted({r["dataset"] for r in runs})
            pcas = dict(zip(datasets, pool.map(run_pca, datasets)))
            runs += scvi_runs(pool, args, datasets, sorted({r["seed"] for r in runs}))
        print(f"rescored {len(runs)} models of {args.rescore} with the current export")
        hvae = next((r for r in runs if r["kind"] == "hvae"), runs[0])
        summarise(datasets, runs, pcas, hvae["model"], hvae["steps"], args.json, started)
        return
    for dataset in args.datasets:
        if dataset not in SYNTHETIC and dataset not in ("pancreas", "pbmc3k"):
            parser.error(f"unknown dataset {dataset!r}")
    from hvae import HVAEConfig

    model = {key: parse_value(value) for key, value in (o.split("=", 1) for o in args.overrides)}
    hvae_dims = list(model.get("latent_dims", HVAEConfig.__dataclass_fields__["latent_dims"].default))
    # The flat model as wide as level 0's exported representation.
    reference = HVAEConfig(n_genes=1, **model)
    flat_width = reference.representation_dims[0] if hasattr(reference, "representation_dims") else hvae_dims[0]
    flat = {
        **{k: v for k, v in model.items() if k not in ("latent_dims", "kl_capacity", "module_levels")},
        "latent_dims": [flat_width],
    }
    save = str(args.save_models) if args.save_models else None
    tasks = [
        {
            "dataset": d,
            "seed": s,
            "kind": kind,
            "model": m,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "save_models": save,
        }
        for d in args.datasets
        for s in args.seeds
        for kind, m in (("hvae", model), ("flat", flat))
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.jobs} runs at a time, one thread each; "
        f"model {model or 'defaults'}"
    )
    started = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        pcas = {d: pool.submit(run_pca, d) for d in args.datasets}
        runs = list(pool.map(run_model, tasks))
        pcas = {d: f.result() for d, f in pcas.items()}
        runs += scvi_runs(pool, args, args.datasets, args.seeds)
    summarise(args.datasets, runs, pcas, model, args.steps, args.json, started)


def scvi_runs(pool, args, datasets, seeds) -> list[dict]:
    if not args.scvi_python:
        return []
    return list(
        pool.map(run_scvi, [{"dataset": d, "seed": s, "python": args.scvi_python} for d in datasets for s in seeds])
    )


def summarise(datasets, runs, pcas, model, steps, json_path, started) -> None:
    """Per dataset: the table of medians, the finest-label kNN of each seed, the five checks."""
    report = {"model": model, "steps": steps, "runs": runs, "pca": pcas, "checks": {}}
    failed = 0
    for dataset in [d for d in dict.fromkeys(DATASETS + tuple(SYNTHETIC)) if d in datasets]:
        labels = load_labels(dataset)
        hvae = [r for r in runs if r["dataset"] == dataset and r["kind"] == "hvae"]
        flats = [r for r in runs if r["dataset"] == dataset and r["kind"] == "flat"]
        scvi = [r for r in runs if r["dataset"] == dataset and r["kind"] == "scvi"]
        text, checks = table(dataset, labels, hvae, flats, pcas[dataset], scvi)
        print(text)
        per_seed = {r["seed"]: r for r in hvae}
        flat_seed = {r["seed"]: r for r in flats}
        print(
            f"\n{labels[-1]} kNN by seed (level 0 / level 1 / top; flat):",
            "; ".join(
                f"seed {seed}: "
                + " / ".join(f"{level['knn'][labels[-1]]:.3f}" for level in per_seed[seed]["levels"])
                + (f"; {flat_seed[seed]['levels'][0]['knn'][labels[-1]]:.3f}" if seed in flat_seed else "")
                for seed in sorted(per_seed)
            ),
        )
        failed += sum(not c["passed"] for c in checks)
        report["checks"][dataset] = checks
    print(f"\n{failed} checks failed; total {time.time() - started:.0f} s")
    if json_path:
        json_path.write_text(json.dumps(report, indent=1))


def load_labels(dataset: str) -> list[str]:
    if dataset in SYNTHETIC:
        from pipeline.data.synthetic import SyntheticAtlasSpec

        return list(SyntheticAtlasSpec(**SYNTHETIC[dataset]).label_names)
    return (
        ["cell_type_coarse", "cell_type_fine"]
        if dataset == "pancreas"
        else ["lineage", "cell_type_coarse", "cell_type_fine"]
    )


if __name__ == "__main__":
    main()
