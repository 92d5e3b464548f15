"""Library-size normalisation shared by gene selection (shard time) and the PCA baseline."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def log_normalize(counts: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p(counts / library * target_sum), sparse."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    library = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.diags((target_sum / np.maximum(library, 1.0)).astype(np.float32)) @ counts
    scaled.data = np.log1p(scaled.data)
    return sp.csr_matrix(scaled)


__all__ = ["log_normalize"]
