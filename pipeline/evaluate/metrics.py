"""Representation quality metrics: kNN label accuracy, cluster agreement (NMI/ARI), silhouette,
batch mixing, the PCA baseline, and the scib-metrics suite when its extra is installed.

kNN accuracy of the top level on coarse labels and of level 0 on fine labels is what the model
issue is judged by; ``pipeline.evaluate.report`` puts all of them into the ``evaluate`` report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from ..data.normalize import log_normalize


def knn_accuracy(embedding: np.ndarray, labels, k: int = 15, n_folds: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy of a k-nearest-neighbour classifier (stratified k-fold).

    Args:
        embedding: (cells, dim) representation.
        labels: (cells,) labels; cells with a missing label (NaN/None) are left out.
    """
    if np.shape(embedding)[0] != len(labels):
        raise ValueError(f"embedding has {np.shape(embedding)[0]} rows but labels has {len(labels)}")
    embedding, labels = _labelled(embedding, labels)
    _, counts = np.unique(labels, return_counts=True)
    folds = int(min(n_folds, counts.min())) if counts.min() >= 2 else 2
    splitter = StratifiedKFold(n_splits=max(folds, 2), shuffle=True, random_state=seed)
    # Classes with a single cell cannot be stratified: keep them in training only.
    singletons = np.isin(labels, np.unique(labels)[counts < 2])
    scores = []
    rows = np.flatnonzero(~singletons)
    for train, test in splitter.split(embedding[rows], labels[rows]):
        train_rows = np.concatenate([rows[train], np.flatnonzero(singletons)])
        classifier = KNeighborsClassifier(n_neighbors=min(k, len(train_rows)))
        classifier.fit(embedding[train_rows], labels[train_rows])
        scores.append(classifier.score(embedding[rows[test]], labels[rows[test]]))
    return float(np.mean(scores))


def knn_within(
    embedding: np.ndarray, labels, parents, k: int = 15, n_folds: int = 5, seed: int = 0, min_cells: int = 10
) -> float:
    """kNN accuracy of ``labels`` *within* each parent label: a classifier fitted inside each parent
    group (:func:`knn_accuracy` on its cells alone), averaged weighted by cells.

    What a representation resolves at a label's grain beyond its parent's: a representation that
    holds the lineages and lets the subtypes inside a cell type go scores near chance here, however
    well its overall kNN reads. Parent groups with a single child label (nothing to resolve) or
    fewer than ``min_cells`` labelled cells are left out; NaN if none is left.
    """
    if not (np.shape(embedding)[0] == len(labels) == len(parents)):
        raise ValueError(f"embedding has {np.shape(embedding)[0]} rows, labels {len(labels)}, parents {len(parents)}")
    keep, groups = _within_groups(labels, parents, min_cells)
    embedding = np.asarray(embedding, dtype=np.float32)[keep]
    total, weight = 0.0, 0
    for rows, names in groups:
        total += knn_accuracy(embedding[rows], names, k=k, n_folds=n_folds, seed=seed) * len(rows)
        weight += len(rows)
    return total / weight if weight else float("nan")


def knn_across(embedding: np.ndarray, labels, batches, parents=None, k: int = 15, n_folds: int = 5) -> float:
    """kNN accuracy of ``labels`` with every cell's neighbours drawn from *other* batches (donors):
    the batches split into ``n_folds`` groups, a classifier fitted on the cells of the others.

    Where batches differ in composition (donors do), a representation that keeps the donor reads
    a fine label partly off it (its neighbours share the donor, and the donor's commonest label);
    across batches that shortcut is gone, and what is left is the biology the representation
    shares between donors, as label transfer to a new donor reads it. With ``parents``, within
    each parent label as :func:`knn_within` (groups of one child label or under 10 cells left out).
    NaN with fewer than two batches."""
    batches = np.asarray(batches, dtype=object)
    if not (np.shape(embedding)[0] == len(labels) == len(batches)):
        raise ValueError(f"embedding has {np.shape(embedding)[0]} rows, labels {len(labels)}, batches {len(batches)}")
    embedding = np.asarray(embedding, dtype=np.float32)
    if parents is None:
        keep = _has_label(np.asarray(labels, dtype=object))
        groups = [(np.flatnonzero(keep), np.asarray(labels, dtype=object)[keep].astype(str))]
    else:
        keep, groups = _within_groups(labels, parents, 10)
        positions = np.flatnonzero(keep)
        groups = [(positions[rows], names) for rows, names in groups]
    total, weight = 0.0, 0
    for rows, names in groups:
        group_batches = batches[rows].astype(str)
        unique = np.unique(group_batches)
        if len(unique) < 2:
            continue
        folds = np.random.default_rng(0).permutation(len(unique)) % min(n_folds, len(unique))
        fold_of = dict(zip(unique, folds))
        fold = np.array([fold_of[b] for b in group_batches])
        correct = 0
        for f in np.unique(fold):
            train, test = fold != f, fold == f
            classifier = KNeighborsClassifier(n_neighbors=min(k, int(train.sum())))
            classifier.fit(embedding[rows[train]], names[train])
            correct += int((classifier.predict(embedding[rows[test]]) == names[test]).sum())
        total, weight = total + correct, weight + len(rows)
    return total / weight if weight else float("nan")


def majority_within(labels, parents, min_cells: int = 10) -> float:
    """The accuracy of naming, in each parent group, its most common child label (weighted by cells,
    over the groups :func:`knn_within` scores): the chance level of ``knn_within``. A representation
    at or below it resolves nothing of the label beyond its parent and the label frequencies."""
    if len(labels) != len(parents):
        raise ValueError(f"labels has {len(labels)} rows, parents {len(parents)}")
    _, groups = _within_groups(labels, parents, min_cells)
    total = sum(np.unique(names, return_counts=True)[1].max() for _, names in groups)
    weight = sum(len(rows) for rows, _ in groups)
    return total / weight if weight else float("nan")


def _within_groups(labels, parents, min_cells: int) -> tuple[np.ndarray, list]:
    """(mask of the labelled rows, [(rows among them, their labels)] per parent group with two or more
    child labels and ``min_cells`` cells)."""
    labels, parents = np.asarray(labels, dtype=object), np.asarray(parents, dtype=object)
    keep = _has_label(labels) & _has_label(parents)
    labels, parents = labels[keep].astype(str), parents[keep].astype(str)
    groups = []
    for parent in np.unique(parents):
        rows = np.flatnonzero(parents == parent)
        if len(rows) >= min_cells and len(np.unique(labels[rows])) >= 2:
            groups.append((rows, labels[rows]))
    return keep, groups


def _has_label(labels) -> np.ndarray:
    """True where a cell has a label (not None / NaN)."""
    return np.array(
        [not (label is None or (isinstance(label, float) and np.isnan(label))) for label in labels], dtype=bool
    )


def _labelled(embedding: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """The rows with a label, and their labels as strings."""
    labels = np.asarray(labels, dtype=object)
    keep = _has_label(labels)
    return np.asarray(embedding, dtype=np.float32)[keep], labels[keep].astype(str)


def cluster_agreement(embedding: np.ndarray, labels, seed: int = 0) -> dict[str, float]:
    """NMI and ARI between the labels and a k-means clustering with as many clusters as labels
    (scib-metrics' ``nmi_ari_cluster_labels_kmeans`` rule)."""
    embedding, labels = _labelled(embedding, labels)
    n_clusters = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(embedding)
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
    }


def silhouette_label(embedding: np.ndarray, labels, max_cells: int = 10_000, seed: int = 0) -> float:
    """Average silhouette width of the labels, rescaled to [0, 1] as scib does ((asw + 1) / 2)."""
    embedding, labels = _labelled(embedding, labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    sample = min(max_cells, len(labels))
    return float((silhouette_score(embedding, labels, sample_size=sample, random_state=seed) + 1) / 2)


def batch_mixing(
    embedding: np.ndarray, batches, k: int = 50, max_cells: int = 10_000, seed: int = 0, within=None
) -> float:
    """How well batches mix among each cell's k nearest neighbours: the mean entropy of the
    neighbours' batch frequencies over the entropy of the global batch frequencies (1 = as mixed
    as the data allow, 0 = every neighbourhood from one batch). Haghverdi et al. 2018; scVI.

    With ``within`` (cells,) labels, the same inside each label: a cell's neighbours are sought
    among the cells of its label and the entropy is over that label's own batch frequencies;
    the labels' scores are averaged weighted by their sizes (labels of fewer than k + 1 cells or
    one batch are left out; NaN if every label is). Where batches differ in composition (a
    donor with more of one cell type), the global score falls as a representation resolves the
    types better; the score within labels measures the batch signal left beyond the biology
    (as kBET and scib's batch silhouette are computed per label).
    """
    if within is None:
        return _batch_mixing(embedding, batches, k, max_cells, seed)
    labels = np.asarray(within, dtype=object)
    if len(labels) != np.shape(embedding)[0] or len(batches) != len(labels):
        raise ValueError(f"embedding has {np.shape(embedding)[0]} rows, batches {len(batches)}, within {len(labels)}")
    keep = _has_label(labels)
    embedding, batches, labels = (
        np.asarray(embedding)[keep],
        np.asarray(batches, dtype=object)[keep],
        labels[keep].astype(str),
    )
    total, weight = 0.0, 0
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) <= k:
            continue
        share = max(1, int(round(max_cells * len(rows) / len(labels))))
        score = _batch_mixing(embedding[rows], batches[rows], k, share, seed)
        if np.isfinite(score):
            total, weight = total + score * len(rows), weight + len(rows)
    return float(total / weight) if weight else float("nan")


def _batch_mixing(embedding: np.ndarray, batches, k: int, max_cells: int, seed: int) -> float:
    from sklearn.neighbors import NearestNeighbors

    embedding, batches = _labelled(embedding, batches)
    codes, batches = np.unique(batches, return_inverse=True)
    global_frequency = np.bincount(batches) / len(batches)
    global_entropy = -(global_frequency * np.log(global_frequency)).sum()
    if len(codes) < 2 or global_entropy <= 0:
        return float("nan")
    k = min(k, len(batches) - 1)
    queries = np.random.default_rng(seed).choice(len(batches), size=min(max_cells, len(batches)), replace=False)
    neighbours = (
        NearestNeighbors(n_neighbors=k + 1).fit(embedding).kneighbors(embedding[queries], return_distance=False)[:, 1:]
    )
    counts = np.stack([np.bincount(row, minlength=len(codes)) for row in batches[neighbours]]) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(counts > 0, counts * np.log(counts), 0.0).sum(axis=1)
    return float(entropy.mean() / global_entropy)


def scib_scores(
    embedding: np.ndarray, labels, batches=None, n_neighbors: int = 90, seed: int = 0, graphs: dict | None = None
) -> dict[str, float]:
    """The scib-metrics suite on one representation (the ``eval`` extra): Leiden NMI/ARI, cLISI,
    graph connectivity, isolated labels and, with batches, iLISI, kBET and batch silhouette.
    Cells without a label are left out, as in the other metrics. ``graphs``, a dict kept per
    representation, caches the neighbour graph across label columns labelling the same cells."""
    try:
        import scib_metrics
        from scib_metrics.nearest_neighbors import pynndescent
    except ImportError:
        raise ImportError("--scib needs scib-metrics: pip install 'hvae-pipeline[eval]'") from None
    keep = _has_label(labels)
    embedding, labels = (
        np.asarray(embedding, dtype=np.float32)[keep],
        np.asarray(labels, dtype=object)[keep].astype(str),
    )
    graphs = {} if graphs is None else graphs
    key = keep.tobytes()
    if key not in graphs:
        graphs[key] = pynndescent(embedding, n_neighbors=min(n_neighbors, len(labels) - 1), random_state=seed)
    neighbours = graphs[key]
    leiden = scib_metrics.nmi_ari_cluster_labels_leiden(neighbours, labels, seed=seed)
    scores = {
        "leiden_nmi": float(leiden["nmi"]),
        "leiden_ari": float(leiden["ari"]),
        "clisi": float(scib_metrics.clisi_knn(neighbours, labels)),
        "graph_connectivity": float(scib_metrics.graph_connectivity(neighbours, labels)),
    }
    if batches is not None and len(np.unique(np.asarray(batches)[keep].astype(str))) > 1:
        batches = np.asarray(batches)[keep].astype(str)
        # Batch silhouette is defined within labels seen in two batches or more.
        shared = pd.crosstab(labels, batches).gt(0).sum(axis=1).gt(1).any()
        scores.update(
            {
                "ilisi": float(scib_metrics.ilisi_knn(neighbours, batches)),
                "kbet": float(scib_metrics.kbet_per_label(neighbours, batches, labels)),
                "silhouette_batch": float(scib_metrics.silhouette_batch(embedding, labels, batches))
                if shared
                else float("nan"),
                "isolated_labels": float(scib_metrics.isolated_labels(embedding, labels, batches)),
            }
        )
    return scores


def pca_embedding(counts: sp.csr_matrix, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """The standard baseline: PCA of scaled log-normalised counts (as scanpy's default flow)."""
    normalized = log_normalize(counts).toarray()
    normalized -= normalized.mean(axis=0)
    std = normalized.std(axis=0)
    normalized /= np.where(std > 0, std, 1.0)
    np.clip(normalized, -10, 10, out=normalized)
    n_components = min(n_components, min(normalized.shape) - 1)
    return PCA(n_components=n_components, random_state=seed).fit_transform(normalized).astype(np.float32)


def evaluate_levels(level_means: list[np.ndarray], obs, label_columns: list[str], k: int = 15) -> list[dict]:
    """kNN accuracy of every level on every label column: one dict per level (level 0 first)."""
    missing = [column for column in label_columns if column not in obs.columns]
    if missing:
        raise KeyError(f"label column(s) {missing} not in obs (columns: {list(obs.columns)})")
    return [
        {column: knn_accuracy(means, obs[column].to_numpy(), k=k) for column in label_columns} for means in level_means
    ]


__all__ = [
    "batch_mixing",
    "cluster_agreement",
    "evaluate_levels",
    "knn_accuracy",
    "log_normalize",
    "pca_embedding",
    "scib_scores",
    "silhouette_label",
]
