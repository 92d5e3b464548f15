"""Query an embedded atlas: index build and search at scale, label transfer per level, novel cells.

    .venv/bin/python benchmarks/query.py                          # all three parts (1M cells)
    .venv/bin/python benchmarks/query.py --parts scale --scale-cells 10000000
    .venv/bin/python benchmarks/query.py --parts transfer novel
    .venv/bin/python benchmarks/query.py --parts transfer --scvi-python scvi-venv/bin/python

Parts:
- ``scale``: a synthetic atlas of N cells simulated to shards, embedded with a model trained on
  20k of its cells; ``build_index`` timed in a child process (cells/s over all levels, peak RSS,
  size on disk per million cells per level); per level, recall@10 of the index on 1,000 atlas
  cells against exact search (their own row left out) and the query rate at k = 15 (10,000
  cells) next to exact brute-force search over the same store (faiss flat, block by block),
  the peer measured in the same run.
- ``transfer``: train on reference cells, embed them, build the index, map held-out cells
  (``HVAEModel.map_query``) and score each level's transferred labels (accuracy, macro F1) next
  to the same 15-neighbour vote on PCA-50 of the reference (log-normalised, scaled genes) and,
  with ``--scvi-python``, on scvi-tools' SCVI latent (the scVI + kNN recipe of the Census
  tutorials; the query mapped by scArches surgery where it brings new batches).
  synthetic: 2 of 8 donors held out; pbmc3k and pancreas (one batch each): 30% of cells held
  out at random.
- ``novel``: the synthetic atlas with one subtype and one cell type (of another lineage) left out
  of the reference; AUROC of each level's ``unlike_level_<l>_score`` for those cells against the
  held-out cells of known labels, next to PCA-50's mean 15-neighbour distance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def quiet(*_):
    pass


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def train_and_embed(reference, root: Path, steps: int, batch_key: str | None, seed: int = 0):
    """(model, store path): a model trained on ``reference``, its cells embedded into a store."""
    from pipeline import HVAEModel
    from pipeline.embed import EmbedSettings, embed

    reference.write_h5ad(root / "reference.h5ad")
    model = HVAEModel(reference, batch_key=batch_key)
    model.train(max_steps=steps, progress=False, seed=seed)
    model.save(root / "model", overwrite=True)
    embed(
        str(root / "model"),
        {"source": str(root / "reference.h5ad")},
        str(root / "reference.zarr"),
        EmbedSettings(progress=False, overwrite=True),
        echo=quiet,
    )
    return model, str(root / "reference.zarr")


def pca_of(reference, query, n_components: int = 50):
    """PCA of the reference's scaled log-normalised counts, and the query projected on it."""
    from sklearn.decomposition import PCA

    from pipeline.data.normalize import log_normalize

    ref, qry = (log_normalize(adata.X).toarray().astype(np.float64) for adata in (reference, query))
    mean, scale = ref.mean(axis=0), ref.std(axis=0) + 1e-6
    pca = PCA(n_components, random_state=0).fit((ref - mean) / scale)
    return pca.transform((ref - mean) / scale), pca.transform((qry - mean) / scale)


# ---------------------------------------------------------------------------------------- scale
def part_scale(n_cells: int, n_genes: int, steps: int, work: Path) -> dict:
    import anndata as ad
    import zarr

    from pipeline import HVAEModel
    from pipeline.data import ShardSettings, write_shards
    from pipeline.data.sources import ShardSource, SyntheticSource
    from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec
    from pipeline.embed import EmbedSettings, embed
    from pipeline.query import AtlasIndex

    t = time.perf_counter()
    atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=n_cells, n_genes=n_genes, n_donors=8))
    write_shards(
        SyntheticSource(atlas), str(work / "shards"), ShardSettings(shard_size=262_144, seed=0, progress=False)
    )
    print(f"simulated {n_cells:,} cells to shards in {time.perf_counter() - t:.0f} s", flush=True)
    source = ShardSource(str(work / "shards"))
    sample = ad.AnnData(X=source.rows(0, 20_000), var={"feature_id": source.feature_ids})
    sample.var_names = source.feature_ids.astype(str)
    model = HVAEModel(sample)
    model.train(max_steps=steps, progress=False)
    model.save(work / "model")
    t = time.perf_counter()
    embed(
        str(work / "model"),
        {"source": str(work / "shards")},
        str(work / "atlas.zarr"),
        EmbedSettings(progress=False),
        echo=quiet,
    )
    print(f"embedded {n_cells:,} cells in {time.perf_counter() - t:.0f} s", flush=True)

    # the build, in a child process for its peak RSS
    # VmHWM (peak resident set) of the child itself: ru_maxrss would carry this process's peak across exec
    code = (
        "import json, sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.query import build_index;"
        "hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024;"
        "base = hwm(); t = time.perf_counter(); m = build_index(sys.argv[2], echo=print); s = time.perf_counter() - t;"
        "print(json.dumps({'seconds': s, 'rss_mb': hwm(), 'imports_mb': base}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(work / "atlas.zarr")], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    print(done.stdout, end="")
    build = json.loads(done.stdout.strip().splitlines()[-1])
    index = AtlasIndex(str(work / "atlas.zarr.index"))
    group = zarr.open_group(str(work / "atlas.zarr"), mode="r")
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(n_cells, 1_000, replace=False))
    levels = []
    for level, meta in enumerate(index.manifest["levels"]):
        array = group[f"level_{level}/mean"]
        queries = np.asarray(array.get_orthogonal_selection((rows, slice(None))), dtype=np.float32)
        many = np.asarray(array[: min(10_000, n_cells)], dtype=np.float32)
        exact, exact_seconds = exact_search(array, queries, 11)
        exact_many_rate = len(queries) / exact_seconds  # brute force: query cells per second
        t = time.perf_counter()
        _, found = index.search(level, queries, 11)
        truth = [set(e[e != r][:10].tolist()) for e, r in zip(exact, rows)]
        recall = float(np.mean([len(tr & (set(f.tolist()) - {r})) / 10 for tr, f, r in zip(truth, found, rows)]))
        t = time.perf_counter()
        index.search(level, many, 15)
        rate = len(many) / (time.perf_counter() - t)
        size = dir_size(work / "atlas.zarr.index" / f"level_{level}")
        levels.append(
            {
                "level": level,
                "dim": meta["dim"],
                "nprobe": meta["nprobe"],
                "recall_at_10": round(recall, 4),
                "query_cells_per_s": round(rate),
                "exact_cells_per_s": round(exact_many_rate),
                "speedup_vs_exact": round(rate / exact_many_rate, 1),
                "mib_per_million_cells": round(size / 2**20 / (n_cells / 1e6), 1),
            }
        )
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "build_seconds": round(build["seconds"], 1),
        "build_cells_per_s": round(n_cells * len(levels) / build["seconds"]),
        "build_peak_rss_mb": round(build["rss_mb"]),
        "imports_rss_mb": round(build["imports_mb"]),
        "levels": levels,
    }


def exact_search(array, queries: np.ndarray, k: int, block_rows: int = 262_144):
    """Exact k nearest store rows of ``queries`` (faiss flat, block by block) and the seconds taken."""
    import faiss

    from pipeline.query.index import _merge

    t = time.perf_counter()
    best_d = np.full((len(queries), k), np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for lo in range(0, array.shape[0], block_rows):
        block = np.ascontiguousarray(array[lo : lo + block_rows], dtype=np.float32)
        d, i = faiss.knn(queries, block, min(k, len(block)))
        best_d, best_i = _merge(best_d, best_i, d, i + lo, k)
    return best_i, time.perf_counter() - t


# ------------------------------------------------------------------------------------- transfer
def split(name: str):
    """(reference, query, label columns, batch key) for a dataset of hierarchy_quality."""
    import hierarchy_quality as hq

    adata, labels, batch_key = hq.load(name)
    if batch_key:
        donors = sorted(adata.obs[batch_key].astype(str).unique())
        held = adata.obs[batch_key].astype(str).isin(donors[-2:]).to_numpy()
    else:
        held = np.random.default_rng(0).random(adata.n_obs) < 0.3
    return adata[~held].copy(), adata[held].copy(), labels, batch_key


def vote(ref: np.ndarray, qry: np.ndarray, reference, labels: list[str], k: int = 15) -> dict:
    """Each label of ``reference.obs`` transferred to the query by a ``k``-neighbour majority vote
    in an embedding (``ref`` and ``qry``, rows of the reference's and the query's cells)."""
    from sklearn.neighbors import NearestNeighbors

    _, neighbours = NearestNeighbors(n_neighbors=k).fit(ref).kneighbors(qry)
    out = {}
    for label in labels:
        values = reference.obs[label].astype(str).to_numpy()[neighbours]
        out[label] = np.array([max(set(row), key=list(row).count) for row in values])
    return out


def part_transfer(datasets: list[str], steps: int, work: Path, scvi_python: str | None = None) -> list[dict]:
    from sklearn.metrics import accuracy_score, f1_score

    import hierarchy_quality as hq

    rows = []
    for name in datasets:
        reference, query, labels, batch_key = split(name)
        root = work / f"transfer_{name}"
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        model, store = train_and_embed(reference, root, steps, batch_key)
        from pipeline.query import build_index

        build_index(store, echo=quiet)
        mapped = query.copy()
        model.map_query(mapped, store, labels=labels)
        peers = {"pca": vote(*pca_of(reference, query), reference, labels)}
        if scvi_python:
            info, ref_latent, query_latent = hq.scvi_peer(scvi_python, reference, batch_key, query=query)
            print("scvi-tools:", json.dumps(info), flush=True)
            peers["scvi"] = vote(ref_latent, query_latent, reference, labels)
        for label in labels:
            truth = query.obs[label].astype(str).to_numpy()
            row = {"dataset": name, "label": label, "cells": query.n_obs}
            for level in range(model.config.n_levels):
                predicted = mapped.obs[f"{label}_level_{level}"].astype(str).to_numpy()
                row[f"level_{level}"] = (
                    round(accuracy_score(truth, predicted), 3),
                    round(f1_score(truth, predicted, average="macro"), 3),
                )
            for peer, predicted in peers.items():
                row[peer] = (
                    round(accuracy_score(truth, predicted[label]), 3),
                    round(f1_score(truth, predicted[label], average="macro"), 3),
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- novel
def part_novel(steps: int, work: Path) -> dict:
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import NearestNeighbors

    from pipeline.query import build_index

    reference, query, labels, batch_key = split("synthetic")
    subtypes = reference.obs["subtype"].astype(str)
    left_subtype = sorted(subtypes.unique())[0]
    lineage_of = dict(zip(reference.obs["cell_type"].astype(str), reference.obs["lineage"].astype(str)))
    first_lineage = reference.obs["lineage"].astype(str)[subtypes == left_subtype].iloc[0]
    left_type = sorted(t for t, lin in lineage_of.items() if lin != first_lineage)[0]
    drop = (subtypes == left_subtype) | (reference.obs["cell_type"].astype(str) == left_type)
    reference = reference[~drop.to_numpy()].copy()
    root = work / "novel"
    root.mkdir(parents=True, exist_ok=True)
    model, store = train_and_embed(reference, root, steps, batch_key)
    build_index(store, echo=quiet)
    mapped = query.copy()
    model.map_query(mapped, store, labels=["subtype"])
    groups = {
        f"subtype {left_subtype}": (query.obs["subtype"].astype(str) == left_subtype).to_numpy(),
        f"cell type {left_type}": (query.obs["cell_type"].astype(str) == left_type).to_numpy(),
    }
    known = ~np.logical_or.reduce(list(groups.values()))
    ref, qry = pca_of(reference, query)
    pca_score = NearestNeighbors(n_neighbors=15).fit(ref).kneighbors(qry)[0].mean(axis=1)
    out = {}
    for group, novel in groups.items():
        keep = novel | known
        entry = {
            f"level_{level}": round(
                roc_auc_score(novel[keep], mapped.obs[f"unlike_level_{level}_score"].to_numpy()[keep]), 3
            )
            for level in range(model.config.n_levels)
        }
        for level in range(model.config.n_levels):  # the share flagged: of the unseen cells, and of known ones
            flagged = mapped.obs[f"unlike_level_{level}"].to_numpy()
            entry[f"flagged_level_{level}"] = round(float(flagged[novel].mean()), 3)
            entry[f"flagged_known_level_{level}"] = round(float(flagged[known].mean()), 3)
        entry["pca"] = round(roc_auc_score(novel[keep], pca_score[keep]), 3)
        out[group] = entry
        print(group, json.dumps(entry), flush=True)
    return out


def main() -> None:
    from pipeline.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", default=["scale", "transfer", "novel"], choices=["scale", "transfer", "novel"]
    )
    parser.add_argument("--scale-cells", type=int, default=1_000_000)
    parser.add_argument("--n-genes", type=int, default=2_000)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "pbmc3k", "pancreas"])
    parser.add_argument(
        "--steps",
        type=int,
        default=TrainConfig.model_fields["max_steps"].default,
        help="training steps of the transfer and novel models (default: the model's own, train.max_steps)",
    )
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    parser.add_argument(
        "--scvi-python",
        help="a Python with scvi-tools installed: adds the scVI + kNN peer to the transfer table (SCVI with "
        "its defaults on the reference, the query mapped by scArches surgery where it has new batches)",
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hvae-query-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "parts": args.parts}
    try:
        if "scale" in args.parts:
            scale = part_scale(args.scale_cells, args.n_genes, 1_000, work / "scale")
            result["scale"] = scale
            print(f"\n## Index at {scale['n_cells']:,} cells (faiss IVF-Flat, {scale['n_genes']} genes)")
            print(
                f"build: {scale['build_cells_per_s']:,} cells/s over all levels, {scale['build_seconds']} s, "
                f"peak RSS {scale['build_peak_rss_mb']:,} MB (of which the imports {scale['imports_rss_mb']:,} MB)"
            )
            print(
                "| level | dim | nprobe | recall@10 | query cells/s (k=15) | exact search cells/s | ratio | MiB per 1M cells |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for row in scale["levels"]:
                print(
                    f"| {row['level']} | {row['dim']} | {row['nprobe']} | {row['recall_at_10']:.3f} | "
                    f"{row['query_cells_per_s']:,} | {row['exact_cells_per_s']:,} | {row['speedup_vs_exact']}x | "
                    f"{row['mib_per_million_cells']} |"
                )
        if "transfer" in args.parts:
            rows = part_transfer(args.datasets, args.steps, work, args.scvi_python)
            result["transfer"] = rows
            peers = ["pca"] + (["scvi"] if args.scvi_python else [])
            print("\n## Label transfer to held-out cells: accuracy / macro F1 (15-neighbour vote)")
            print("| dataset | label | level 0 | level 1 | top | PCA-50 |" + (" scVI |" if args.scvi_python else ""))
            print("|---|---|---|---|---|---|" + ("---|" if args.scvi_python else ""))
            for row in rows:
                levels = [row[k] for k in sorted(k for k in row if k.startswith("level_"))]
                cells = " | ".join(f"{a:.3f} / {f:.3f}" for a, f in levels + [row[peer] for peer in peers])
                print(f"| {row['dataset']} | {row['label']} | {cells} |")
        if "novel" in args.parts:
            novel = part_novel(args.steps, work)
            result["novel"] = novel
            print("\n## Cells unlike the atlas: AUROC of unlike_level_<l>_score, left-out labels against known ones")
            print(
                "| left out | level 0 | level 1 | top | PCA-50 kNN distance "
                "| flagged, level 0 / 1 / top (known cells) |"
            )
            print("|---|---|---|---|---|---|")
            for group, entry in novel.items():
                flagged = " / ".join(
                    f"{entry[f'flagged_level_{level}']} ({entry[f'flagged_known_level_{level}']})" for level in range(3)
                )
                print(
                    f"| {group} | {entry['level_0']} | {entry['level_1']} | {entry['level_2']} | {entry['pca']} | "
                    f"{flagged} |"
                )
        print(
            f"\npeak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB; "
            f"machine {result['machine']}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
