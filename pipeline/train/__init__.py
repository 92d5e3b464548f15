"""The training stage: one optimisation step (``step``), the per-worker loop on shards (``loop``),
the local and Ray Train launchers (``launch``), checkpoints, and in-memory fitting for small data.

>>> from pipeline.train import train               # hvae-pipeline train
>>> from pipeline.train import fit_in_memory       # a few thousand cells, one call
"""

from .checkpoint import find_checkpoint, load_model
from .in_memory import FitResult, batch_codes, diagnostic_kl, fit_in_memory, with_gene_modules
from .launch import train
from .step import Trainer, encode_in_batches, in_memory_batches

__all__ = [
    "FitResult",
    "Trainer",
    "batch_codes",
    "diagnostic_kl",
    "encode_in_batches",
    "find_checkpoint",
    "fit_in_memory",
    "in_memory_batches",
    "load_model",
    "train",
    "with_gene_modules",
]
