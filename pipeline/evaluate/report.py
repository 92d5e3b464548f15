"""``hvae-pipeline evaluate``: every level of an embeddings store (and any baselines) scored
against label columns and a batch key, written as metrics.json, a Markdown report and one 2-D map
per representation.

The cells are a seeded random subsample (``max_cells``) so the cost does not grow with the atlas;
labels come from the source the embeddings were made from (recorded in their attrs) or from
``source``, matched by obs id.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from hvae import active_units

from ..embed.store import EmbeddingsView
from ..storage import StorageError, check_writable, recover_replace, remove_tree, replace_tree
from .metrics import (
    batch_mixing,
    cluster_agreement,
    knn_accuracy,
    knn_within,
    pca_embedding,
    scib_scores,
    silhouette_label,
)

MAP_METHODS = ("auto", "umap", "pca")
METRIC_NAMES = {
    "nmi": "NMI (k-means)",
    "ari": "ARI (k-means)",
    "silhouette": "silhouette (ASW)",
    "leiden_nmi": "NMI (Leiden)",
    "leiden_ari": "ARI (Leiden)",
    "clisi": "cLISI",
    "graph_connectivity": "graph connectivity",
    "ilisi": "iLISI",
    "kbet": "kBET",
    "silhouette_batch": "batch ASW",
    "isolated_labels": "isolated labels",
}


@dataclass(frozen=True)
class EvaluateSettings:
    labels: tuple[str, ...]
    batch_key: str | None = None
    out_dir: str | None = None  # default: <embeddings without .zarr>_report next to the store
    source: dict | None = None  # open_source arguments; default: the ones the embeddings record
    compare: dict = field(default_factory=dict)  # name -> another embeddings store (e.g. a flat model's)
    pca: bool = False  # add the PCA baseline (reads the subsample's counts)
    max_cells: int = 50_000
    k: int = 15
    seed: int = 0
    maps: bool = True
    map_method: str = "auto"  # umap when umap-learn is installed, else pca
    map_cells: int = 10_000
    scib: bool = False  # add the scib-metrics suite (the `eval` extra)
    overwrite: bool = False  # replace an earlier report in out_dir (once the new one is complete)

    def __post_init__(self) -> None:
        for name in ("max_cells", "k", "map_cells"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


def evaluate_embeddings(path: str, settings: EvaluateSettings, echo=print) -> dict:
    from ..data import open_source

    started = time.perf_counter()
    if settings.map_method not in MAP_METHODS:
        raise ValueError(f"map method must be one of {MAP_METHODS}, got {settings.map_method!r}")
    if not settings.labels:
        raise ValueError("give at least one label column (--labels COL[,COL...])")
    final = Path(settings.out_dir or _default_out_dir(path))
    out_dir = _report_dir(final, settings.overwrite)  # refused before the work, not after
    store = EmbeddingsView(path)
    attrs = store.uns["hvae_embeddings"]
    source_args = settings.source or _recorded_source(attrs, path)
    rng = np.random.default_rng(settings.seed)
    n_total = store.n_obs
    rows = np.sort(rng.choice(n_total, size=min(settings.max_cells, n_total), replace=False))
    obs_ids = store.obs_ids_at(rows)

    with open_source(**source_args) as source:
        obs, position = _obs_at(source, obs_ids)
        if (position < 0).any():
            raise KeyError(
                f"{int((position < 0).sum())} cells of {path} are not in the source {source.uri} "
                f"(e.g. {list(obs_ids[position < 0][:3])}); pass the source they were embedded from"
            )
        columns = list(settings.labels) + ([settings.batch_key] if settings.batch_key else [])
        if settings.batch_key and settings.batch_key in settings.labels:
            raise ValueError(
                f"{settings.batch_key!r} is both a label column and the batch key: a label is what a "
                "representation should keep, a batch what it should mix away; pass it as one of them"
            )
        missing = [c for c in columns if c not in obs.columns]
        if missing:
            raise KeyError(f"column(s) {missing} not in the obs of {source.uri} (columns: {list(obs.columns)})")
        obs = obs[columns]
        _check_labels(obs, settings, source.uri)
        counts = _rows_at(source, position) if settings.pca else None
        level_kl = _level_kl(attrs, source, position, counts, echo)

    representations = _representations(store, rows, settings, counts)
    echo(
        f"evaluating {len(representations)} representations on {len(rows):,} of {n_total:,} cells "
        f"(labels {', '.join(settings.labels)}{'; batch ' + settings.batch_key if settings.batch_key else ''})"
    )
    labelled = {label: int(obs[label].notna().sum()) for label in settings.labels}
    for label, count in labelled.items():
        if count < len(obs):
            echo(f"  {label}: {count:,} of {len(obs):,} cells labelled; the unlabelled ones are left out of its scores")
    results = []
    for name, values, level, own in representations:
        result = {
            "representation": name,
            "level": level,
            "dim": int(values.shape[1]),
            "active_units": None if own is None else active_units([torch.from_numpy(values[:, :own])])[0],
            "labels": {},
        }
        graphs: dict = {}  # the scib neighbour graph, computed once per representation and set of labelled cells
        for index, label in enumerate(settings.labels):
            truth = obs[label].to_numpy()
            result["labels"][label] = {
                "knn_accuracy": knn_accuracy(values, truth, k=settings.k, seed=settings.seed),
                **cluster_agreement(values, truth, seed=settings.seed),
                "silhouette": silhouette_label(values, truth, seed=settings.seed),
            }
            if index:  # labels run coarsest -> finest: what this one adds inside the label before it
                parent = obs[settings.labels[index - 1]].to_numpy()
                result["labels"][label]["knn_within_parent"] = knn_within(
                    values, truth, parent, k=settings.k, seed=settings.seed
                )
            if settings.scib:
                result["labels"][label].update(
                    scib_scores(
                        values,
                        truth,
                        obs[settings.batch_key].to_numpy() if settings.batch_key else None,
                        seed=settings.seed,
                        graphs=graphs,
                    )
                )
        if settings.batch_key:
            batches = obs[settings.batch_key].to_numpy()
            result["batch_mixing"] = batch_mixing(values, batches, seed=settings.seed)
            if settings.labels:  # inside the last (finest) label column: the batch signal beyond composition
                result["batch_mixing_within"] = batch_mixing(
                    values, batches, seed=settings.seed, within=obs[settings.labels[-1]].to_numpy()
                )
        results.append(result)
        echo(f"  {name}: " + ", ".join(f"kNN {l} {result['labels'][l]['knn_accuracy']:.3f}" for l in settings.labels))

    if level_kl is not None:
        echo(
            "KL per level (nats per cell, level 0 first): "
            + " / ".join(f"{v:.2f}" for v in level_kl["nats"])
            + "; shares "
            + " / ".join(f"{v:.0%}" for v in level_kl["share"])
        )
    guidance = level_guidance(results, _n_levels(store), settings.labels)
    echo("which level to use:")
    for line in guidance:
        echo("  " + line)
    out_dir.mkdir(parents=True, exist_ok=True)
    maps = _draw_maps(representations, obs, settings, out_dir) if settings.maps else {}
    summary = {
        "embeddings": str(path),
        "model_id": attrs.get("model_id"),
        "checkpoint": attrs.get("checkpoint"),
        "source": source_args,
        "cells_evaluated": int(len(rows)),
        "cells_total": int(n_total),
        "labels": list(settings.labels),
        "labelled_cells": labelled,
        "batch_key": settings.batch_key,
        "k": settings.k,
        "seed": settings.seed,
        "compare": dict(settings.compare),
        "scib": settings.scib,
        "results": results,
        "guidance": guidance,
        "maps": maps,
        "level_kl": level_kl,
        "machine": platform.platform(),
        "created": datetime.now(timezone.utc).isoformat(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for name, text in (
        ("metrics.json", json.dumps(summary, indent=2, default=_json_default)),
        ("report.md", format_report(summary)),
    ):
        staged = out_dir / f".{name}.partial"
        staged.write_text(text)
        os.replace(staged, out_dir / name)  # a report replaced whole, never half-written
    if out_dir != final:  # --overwrite: the earlier report is replaced only now, by a complete new one
        replace_tree(str(out_dir), str(final))
    summary["report"] = str(final / "report.md")
    return summary


REPORT_FILES = {"metrics.json", "report.md", "maps"}


def _report_dir(out_dir: Path, overwrite: bool) -> Path:
    """Where ``evaluate`` writes its report: ``out_dir`` when absent or empty; with ``overwrite``
    over a report it wrote before, a sibling that replaces it once complete. A report is refused
    without ``overwrite``, a folder holding anything else even with it, and an unwritable place is
    named, before any work is done."""
    recover_replace(str(out_dir))  # an --overwrite swap cut short by a kill
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a folder; choose another --out (nothing was changed)")
    present = {p.name for p in out_dir.iterdir() if not p.name.startswith(".")} if out_dir.is_dir() else set()
    if present and not (present <= REPORT_FILES and "embeddings" in _json_or_empty(out_dir / "metrics.json")):
        raise FileExistsError(
            f"--out {out_dir} holds files that are not an evaluate report ({sorted(present)[:5]}); "
            "choose an empty or new folder (nothing was changed)"
        )
    if present and not overwrite:
        raise FileExistsError(
            f"--out {out_dir} holds an evaluate report already; pass --overwrite to replace it (once "
            "the new one is complete), or choose another --out (nothing was changed)"
        )
    probe = out_dir if out_dir.is_dir() else next(p for p in out_dir.parents if p.exists())
    try:
        check_writable(str(probe))
    except StorageError as error:
        raise StorageError(f"--out {out_dir}: {error}; choose another --out (nothing was changed)") from None
    if not present:
        return out_dir
    staged = out_dir.with_name(out_dir.name + ".overwrite-partial")
    remove_tree(str(staged))  # our own scratch from a run cut short
    return staged


def _json_or_empty(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _level_kl(
    attrs: dict,
    source,
    position: np.ndarray,
    counts: sp.csr_matrix | None,
    echo,
    n_cells: int = 4096,
    block: int = 16_384,
) -> dict | None:
    """Each level's KL (nats per cell) and its share of the total, from the store's checkpoint on up
    to ``n_cells`` of the evaluated cells; None (said) where the checkpoint cannot be read. The
    KL does not read batches (the encoder reads none), so no batch labels are needed.

    ``counts``: the evaluated cells' rows where they were read already (``--pca``); otherwise the
    cells come from a few source blocks drawn at random, not from a pass over the whole source."""
    import torch

    from ..data import GeneAlignment, densify
    from ..train.checkpoint import fetch_checkpoint, load_model

    try:
        found = fetch_checkpoint(attrs.get("checkpoint") or "")
        if found is None:
            raise FileNotFoundError(attrs.get("checkpoint"))
        model, parts = load_model(found[0])
    except Exception as error:  # noqa: BLE001 - the KL is a diagnostic: the scores stand without it
        echo(
            f"  (KL per level left out: the checkpoint {attrs.get('checkpoint')!r} cannot be read: {type(error).__name__})"
        )
        return None
    if counts is not None:
        counts = counts[:n_cells]
    else:
        blocks = np.random.default_rng(0).permutation(np.unique(position // block))
        per_block = np.bincount(position // block)[blocks]
        taken = blocks[: int(np.searchsorted(np.cumsum(per_block), n_cells)) + 1]
        counts = _rows_at(source, position[np.isin(position // block, taken)][:n_cells], block)
    counts = GeneAlignment(source.feature_ids, parts["genes"]["feature_ids"]).apply(counts)
    batches = torch.zeros(counts.shape[0], dtype=torch.long) if model.config.n_batches else None
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        kl = [float(v) for v in model.eval()(densify(counts, "cpu"), batches).kl]
    total = sum(kl)
    return {"nats": kl, "share": [v / total if total > 0 else 0.0 for v in kl], "cells": int(counts.shape[0])}


def _check_labels(obs: pd.DataFrame, settings: EvaluateSettings, uri: str) -> None:
    """Refuse labels that no kNN can score: one class, a continuous column, or fewer labelled cells
    than the neighbours a 5-fold kNN needs (every level would score the majority vote)."""
    for label in settings.labels:
        column = obs[label].dropna()
        classes = column.nunique()
        if classes < 2:
            raise ValueError(
                f"label column {label!r} of {uri} has {classes} class(es) among the evaluated cells: there is "
                "nothing to tell apart; pass a column with at least two labels"
            )
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        if numeric and classes > max(50, len(column) // 10):
            raise ValueError(
                f"label column {label!r} of {uri} looks continuous ({classes:,} distinct values over "
                f"{len(column):,} cells): kNN accuracy scores categories; bin it or pass a categorical column"
            )
        if classes > len(column) // 2:
            raise ValueError(
                f"label column {label!r} of {uri} has {classes:,} distinct values over {len(column):,} cells: "
                "most cells are alone in their label (an id, not a label); pass a column of cell types"
            )
        if settings.k >= int(0.8 * len(column)):
            raise ValueError(
                f"--k {settings.k} is not below the {int(0.8 * len(column)):,} labelled cells a 5-fold kNN "
                f"trains on for {label!r}: every representation would score the majority vote; lower --k"
            )


def _recorded_source(attrs: dict, path: str) -> dict:
    recorded = attrs.get("source_args")
    if not recorded:
        raise ValueError(f"{path} does not record the source it was embedded from; pass --source")
    return json.loads(recorded) if isinstance(recorded, str) else dict(recorded)


def _default_out_dir(path: str) -> str:
    base = str(path).rstrip("/")
    return (base[:-5] if base.endswith(".zarr") else base) + "_report"


def _representations(store, rows: np.ndarray, settings: EvaluateSettings, counts) -> list:
    """(name, values, level, own units) for every level of the store (top first), each compared store, PCA.
    A level of a store with the code export holds the code from that level up, its own units the
    first ``own``; one of the read-out export (``HierarchicalVAE.encode``) holds no units (``own``
    None: active units are in the training log)."""

    def levels(adata, rows: np.ndarray, prefix: str) -> list:
        means = _level_means(adata, rows)
        top = len(means) - 1
        tags = {top: " (top)", 0: " (finest)"} if top > 0 else {}
        own = _own_widths(adata, [m.shape[1] for m in means])
        if top == 0 and prefix.strip():  # a one-level baseline is named by its name alone
            return [(prefix.strip(), means[0], 0, own[0])]
        return [
            (f"{prefix}level {level}{tags.get(level, '')}", means[level], level, own[level])
            for level in reversed(range(len(means)))
        ]

    representations = levels(store, rows, "HVAE " if settings.compare or settings.pca else "")
    for name, other_path in settings.compare.items():
        other = EmbeddingsView(other_path)
        position = other.positions_of(store.obs_ids_at(rows))
        if (position < 0).any():
            raise KeyError(f"{int((position < 0).sum())} evaluated cells are missing from {other_path} ({name})")
        representations += levels(other, position, f"{name} ")
    if counts is not None:
        pca = pca_embedding(counts, seed=settings.seed)
        representations.append(("PCA (50 comps)", pca, None, pca.shape[1]))
    return representations


def _own_widths(adata, widths: list[int]) -> list:
    """Each level's own units (z_l's), from the store's ``latent_dims``; None for each level of a
    read-out export (its columns are not units)."""
    attrs = adata.uns.get("hvae_embeddings", {})
    if attrs.get("export", "code") != "code":
        return [None] * len(widths)
    latent = attrs.get("latent_dims")
    if isinstance(latent, str):
        latent = json.loads(latent)
    return list(latent) if latent else widths


def _n_levels(adata) -> int:
    return sum(1 for key in adata.obsm if not key.endswith("_logvar"))


def _level_means(adata, rows: np.ndarray) -> list[np.ndarray]:
    """Every level's means at ``rows`` (any order; the lazy arrays are read in sorted order)."""
    order = np.argsort(rows)
    n_levels = _n_levels(adata)
    means = []
    for level in range(n_levels):
        values = np.asarray(adata.obsm[f"X_hvae_level_{level}"][rows[order]])
        restored = np.empty_like(values)
        restored[order] = values
        means.append(restored)
    return means


def _obs_at(source, obs_ids: np.ndarray, block: int = 1_000_000) -> tuple[pd.DataFrame, np.ndarray]:
    """The source's obs rows for ``obs_ids`` (in that order) and their positions in the source
    (-1 where absent), reading the obs a block at a time (never a whole atlas's obs at once)."""
    wanted = pd.Index(np.asarray(obs_ids, dtype=object))
    position = np.full(len(wanted), -1, np.int64)
    frames, at = [], []
    for lo in range(0, source.n_obs, block):
        part = source.obs_rows(lo, min(source.n_obs, lo + block))
        where = wanted.get_indexer(part.index.astype(str))
        hit = np.flatnonzero(where >= 0)
        position[where[hit]] = lo + hit
        frames.append(part.iloc[hit])
        at.append(where[hit])
    if not frames:
        return source.obs_rows(0, 0), position
    found = pd.concat(frames) if len(frames) > 1 else frames[0]
    if (position < 0).any():
        return found, position  # the caller names the missing cells
    order = np.empty(len(wanted), np.int64)
    order[np.concatenate(at)] = np.arange(len(found))
    return found.iloc[order], position


def _rows_at(source, positions: np.ndarray, block: int = 16_384) -> sp.csr_matrix:
    """The source's count rows at ``positions`` (any order), read block by block in one pass."""
    order = np.argsort(positions)
    wanted = positions[order]
    parts = []
    for start in range(0, source.n_obs, block):
        lo, hi = np.searchsorted(wanted, [start, min(start + block, source.n_obs)])
        if hi > lo:
            parts.append(source.rows(start, min(start + block, source.n_obs))[wanted[lo:hi] - start])
    stacked = sp.vstack(parts).tocsr()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return stacked[inverse]


def _draw_maps(representations: list, obs: pd.DataFrame, settings: EvaluateSettings, out_dir: Path) -> dict:
    """One PNG per representation: its 2-D map, one panel per label column (and the batch key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method = settings.map_method
    if method == "auto":
        try:
            import umap  # noqa: F401

            method = "umap"
        except ImportError:
            method = "pca"
    cells = np.random.default_rng(settings.seed + 1).permutation(len(obs))[: settings.map_cells]
    columns = list(settings.labels) + ([settings.batch_key] if settings.batch_key else [])
    maps_dir = out_dir / "maps"
    maps_dir.mkdir(exist_ok=True)
    written = {}
    for name, values, _, _ in representations:
        xy = _project(values[cells], method, settings.seed)
        figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 4.0), squeeze=False)
        for axis, column in zip(axes[0], columns):
            raw = pd.Series(obs[column].to_numpy()[cells])
            categories = pd.Categorical(raw.where(raw.isna(), raw.astype(str)))  # unlabelled: code -1
            palette = plt.get_cmap("tab20" if len(categories.categories) > 10 else "tab10")
            colours = [palette(c % palette.N) if c >= 0 else (0.8, 0.8, 0.8, 0.6) for c in categories.codes]
            axis.scatter(xy[:, 0], xy[:, 1], s=2, c=colours, linewidths=0, rasterized=True)
            axis.set_title(column, fontsize=10)
            axis.set_xticks([]), axis.set_yticks([])
            if len(categories.categories) <= 20:
                handles = [
                    plt.Line2D([], [], marker="o", ls="", color=palette(i % palette.N), markersize=4, label=str(c))
                    for i, c in enumerate(categories.categories)
                ]
                axis.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        figure.suptitle(f"{name} ({method.upper()}, {len(cells):,} cells)", fontsize=11)
        figure.tight_layout()
        file = maps_dir / (_slug(name) + ".png")
        figure.savefig(file, dpi=110)
        plt.close(figure)
        written[name] = str(file.relative_to(out_dir))
    return written


def _project(values: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "umap":
        import umap

        return umap.UMAP(random_state=seed, n_jobs=1).fit_transform(values)
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(values) if values.shape[1] > 2 else values[:, :2]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def level_guidance(results: list[dict], n_levels: int, labels) -> list[str]:
    """Per label column, the store's best level by kNN accuracy (the coarsest within 0.005 of the
    best: the most compact) and the ``use_rep`` key that reads it (``results`` starts with the
    store's levels, top first); a baseline that scores higher is named."""
    lines = []
    for label in labels:
        best = max(r["labels"][label]["knn_accuracy"] for r in results[:n_levels])
        # results start with the top: the coarsest (most compact) level within 0.005 of the best
        own = next(r for r in results[:n_levels] if r["labels"][label]["knn_accuracy"] >= best - 0.005)
        score = own["labels"][label]["knn_accuracy"]
        line = (
            f"{label}: level {own['level']} (kNN {score:.3f}): "
            f'sc.pp.neighbors(adata, use_rep="X_hvae_level_{own["level"]}")'
        )
        better = [r for r in results[n_levels:] if r["labels"][label]["knn_accuracy"] > score + 0.005]
        if better:
            top = max(better, key=lambda r: r["labels"][label]["knn_accuracy"])
            line += f"; {top['representation']} scores higher here ({top['labels'][label]['knn_accuracy']:.3f})"
        lines.append(line)
    return lines


def format_report(summary: dict) -> str:
    """The Markdown report: provenance, one table per label column, batch mixing, the maps."""
    results, labels = summary["results"], summary["labels"]
    lines = [
        f"# Evaluation of `{summary['embeddings']}`",
        "",
        f"- model `{summary['model_id']}` ({summary['checkpoint']})",
        f"- labels from `{summary['source'].get('source')}`; {summary['cells_evaluated']:,} of "
        f"{summary['cells_total']:,} cells (seed {summary['seed']}), kNN k={summary['k']} (5-fold held-out accuracy)",
        f"- {summary['created']} on {summary['machine']}",
    ]
    if summary.get("level_kl"):
        kl = summary["level_kl"]
        lines.append(
            f"- KL per level (nats per cell on {kl['cells']:,} cells, level 0 first): "
            + " / ".join(f"{v:.2f}" for v in kl["nats"])
            + " (shares "
            + " / ".join(f"{v:.0%}" for v in kl["share"])
            + ")"
        )
    lines.append("")
    if summary.get("guidance"):
        lines += (
            [
                "## Which level to use",
                "",
                "The level with the best kNN accuracy for each label column, and the key "
                "`read_embeddings` gives it in `adata.obsm`:",
                "",
            ]
            + [f"- {line}" for line in summary["guidance"]]
            + [""]
        )
    for label in labels:
        metrics = [m for m in results[0]["labels"][label] if m != "knn_accuracy"]
        header = ["representation", "dim", "kNN accuracy"] + [METRIC_NAMES.get(m, m) for m in metrics]
        count = summary.get("labelled_cells", {}).get(label, summary["cells_evaluated"])
        lines += [
            f"## `{label}`",
            "",
            f"{count:,} of {summary['cells_evaluated']:,} cells labelled"
            + ("; the others are left out of these scores." if count < summary["cells_evaluated"] else "."),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        best = {m: max(r["labels"][label][m] for r in results) for m in ["knn_accuracy"] + metrics}
        for r in results:
            scores = r["labels"][label]
            cells = [_cell(scores[m], scores[m] == best[m]) for m in ["knn_accuracy"] + metrics]
            lines.append("| " + " | ".join([r["representation"], str(r["dim"])] + cells) + " |")
        lines.append("")
    within = bool(summary["batch_key"]) and all("batch_mixing_within" in r for r in results)
    finest = summary["labels"][-1] if within else None
    lines += [
        "## Levels and batches",
        "",
        "| representation | dim | active units |"
        + (" batch mixing |" if summary["batch_key"] else "")
        + (f" batch mixing within `{finest}` |" if within else ""),
        "|---|---|---|" + ("---|" if summary["batch_key"] else "") + ("---|" if within else ""),
    ]
    for r in results:
        lines.append(
            f"| {r['representation']} | {r['dim']} | {'-' if r['active_units'] is None else r['active_units']} |"
            + (f" {_cell(r['batch_mixing'])} |" if summary["batch_key"] else "")
            + (f" {_cell(r['batch_mixing_within'])} |" if within else "")
        )
    if summary["batch_key"]:
        lines += [
            "",
            f"Batch mixing: entropy of `{summary['batch_key']}` among 50 nearest neighbours over its global "
            "entropy (1 = fully mixed)."
            + (
                f" Within `{finest}`: the same among the cells of each `{finest}` label, over that label's own "
                f"`{summary['batch_key']}` entropy, averaged by label size; batches that differ in composition "
                "lower the global score of a representation that resolves the labels well, not this one."
                if within
                else ""
            ),
        ]
    if summary["maps"]:
        lines += ["", "## Maps", ""] + [f"![{name}]({file})" for name, file in summary["maps"].items()]
    return "\n".join(lines) + "\n"


def _cell(value: float, best: bool = False) -> str:
    text = "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"
    return f"**{text}**" if best and text != "-" else text


__all__ = ["EvaluateSettings", "evaluate_embeddings", "format_report", "level_guidance"]
