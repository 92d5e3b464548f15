"""The evaluation stage: representation metrics (kNN accuracy, NMI/ARI, silhouette, batch
mixing, PCA baseline, scib-metrics) and ``evaluate``, the report on an embeddings store."""

from .metrics import (
    batch_mixing,
    cluster_agreement,
    evaluate_levels,
    knn_accuracy,
    knn_across,
    knn_within,
    majority_within,
    pca_embedding,
    scib_scores,
    silhouette_label,
)
from .report import EvaluateSettings, evaluate_embeddings

__all__ = [
    "EvaluateSettings",
    "batch_mixing",
    "cluster_agreement",
    "evaluate_embeddings",
    "evaluate_levels",
    "knn_accuracy",
    "knn_across",
    "knn_within",
    "majority_within",
    "pca_embedding",
    "scib_scores",
    "silhouette_label",
]
