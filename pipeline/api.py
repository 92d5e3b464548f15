"""The notebook API: an AnnData in, one representation per level out, in the scvi-tools shape.

    from pipeline import HVAEModel
    model = HVAEModel(adata, batch_key="donor_id", n_top_genes=2000)
    model.train()
    adata.obsm["X_hvae"] = model.get_latent_representation(level=0)    # level 0: the finest
    model.save("my_model")            # a checkpoint `hvae-pipeline embed --checkpoint my_model` takes

It runs the same training step, checks, early stopping and checkpoint format as
``hvae-pipeline train``, on cells held in memory (an in-memory or backed AnnData). Atlases that
do not fit go through ``shard`` and ``train`` instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hvae import HVAEConfig, HierarchicalVAE

from .config import TrainConfig
from .data.alignment import GeneAlignment, gene_id_note, gene_ids_of, looks_like_counts
from .data.genes import GeneStatistics
from .train import batch_codes, fit_in_memory, with_gene_modules
from .train.checkpoint import find_checkpoint, load_model, save_checkpoint
from .train.loop import end_of_run_warnings
from .train.step import encode_in_batches
from .embed.write import model_id


class HVAEModel:
    """A hierarchical VAE bound to an AnnData's genes (and batches).

    Args:
        adata: cells x genes with raw integer counts in ``X`` or in ``layer`` (``"raw"`` for
            ``adata.raw.X``). Backed AnnData works; its counts are read once, in row blocks.
        layer: where the counts are (default ``X``).
        batch_key: an obs column of batches (donors, datasets) for the decoder; the encoder and
            so the representations do not read it.
        n_top_genes: keep this many highly variable genes (the ``shard`` selection).
        genes: keep these gene ids, in this order (e.g. another model's gene list).
        gene_column: the var column with gene ids (default: the first of feature_id, gene_ids,
            gene_id, ensembl_id, else var_names).
        **model_options: ``hvae.HVAEConfig`` fields, e.g. ``latent_dims=(32, 16, 8)``.
    """

    def __init__(
        self,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        n_top_genes: int | None = None,
        genes: list[str] | None = None,
        gene_column: str | None = None,
        **model_options,
    ) -> None:
        if n_top_genes is not None and genes is not None:
            raise ValueError("give n_top_genes or genes, not both")
        if n_top_genes is not None and (
            isinstance(n_top_genes, bool) or not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1
        ):
            raise ValueError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
        if adata.n_obs == 0:
            raise ValueError("the AnnData has 0 cells: nothing to train on")
        self.layer, self.batch_key, self.gene_column, self.n_top_genes = layer, batch_key, gene_column, n_top_genes
        counts = _counts(adata, layer)
        ids, self._ids_from = _var_ids(adata, layer, gene_column)
        names = _var_names(adata, layer)
        if genes is not None:
            alignment = GeneAlignment(ids, genes, source_name="adata", id_note=gene_id_note(self._ids_from))
            print(f"genes: {alignment.summary()}")
            counts, self.feature_ids = alignment.apply(counts), list(alignment.target_ids)
            lookup = dict(zip(ids, names, strict=True))
            self.feature_names = [lookup.get(g, g) for g in self.feature_ids]
        elif n_top_genes is not None:
            stats = GeneStatistics(counts.shape[1])
            stats.update(counts)
            keep = np.asarray(stats.highly_variable(n_top_genes))
            counts, self.feature_ids, self.feature_names = counts[:, keep], list(ids[keep]), list(names[keep])
        else:
            self.feature_ids, self.feature_names = list(ids), list(names)
        self._counts = sp.csr_matrix(counts, dtype=np.float32)
        _check_batch_column(adata.obs, batch_key)
        self._batch_index, self.batch_categories = batch_codes(adata.obs, batch_key)
        self.config = with_gene_modules(
            HVAEConfig(n_genes=len(self.feature_ids), n_batches=len(self.batch_categories), **model_options),
            self._counts,
        )
        self.module = HierarchicalVAE(self.config)
        self.result = None
        self.model_id = None  # set by save and load: which checkpoint these weights are

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_steps: int = TrainConfig.model_fields["max_steps"].default,
        batch_size: int = 256,
        precision: str = "fp32",
        device: str = "cpu",
        progress: bool = True,
        **train_options,
    ) -> "HVAEModel":
        """Train with the pipeline's training step (``pipeline.config.TrainConfig`` options, e.g.
        ``learning_rate``, ``kl_warmup_steps``, ``early_stopping``); returns self."""
        if self._counts is None:
            raise ValueError("this model was loaded without training data; train it with HVAEModel(adata)")
        options = {"log_every": 100, **train_options}
        train = TrainConfig(max_steps=max_steps, batch_size=batch_size, precision=precision, **options)
        n_cells = self._counts.shape[0]
        if progress:
            held = int(round(train.validation_fraction * n_cells)) if train.early_stopping else 0
            print(
                f"training on {device}: {n_cells - held:,} cells ({held:,} held out for early stopping) x "
                f"{self.config.n_genes:,} genes, {self.config.n_batches} batches; levels {self.config.latent_dims}; up to "
                f"{max_steps:,} steps of {batch_size} cells ({max_steps * batch_size / max(n_cells - held, 1):.0f} epochs), "
                f"KL warm-up {train.warmup_steps:,} steps"
            )
        self.result = fit_in_memory(
            self._counts, self.config, train, self._batch_index, device=device, progress=progress
        )
        self.module = self.result.model
        self.model_id = None  # new weights: the checkpoint they came from no longer describes them
        if progress and self.result.best_step is not None:
            print(
                f"stopped early at step {self.result.steps:,} (held-out -ELBO rising); kept step {self.result.best_step:,}"
            )
        for line in end_of_run_warnings(
            self.result.steps, train.warmup_steps, self.result.kl_per_level, self.result.active_units
        ):
            warnings.warn(line, stacklevel=2)
        return self

    # ------------------------------------------------------------------ representations
    def get_latent_representation(
        self, adata=None, level: int | str = 0, batch_size: int = 4096, device: str = "cpu", layer: str | None = None
    ):
        """Level ``level``'s representation of every cell, (cells, width): level 0 (the finest)
        for subtypes, the top for lineages. ``level="all"`` gives ``{level: array}``.

        ``adata`` (default: the training cells) may be a new dataset: its genes are aligned to
        the model's by id (missing ones zero-filled, reported), as ``hvae-pipeline embed`` does."""
        counts = self._counts if adata is None else self._aligned(adata, layer if layer is not None else self.layer)
        if counts is None:
            raise ValueError("this model was loaded without data: pass adata=")
        if self.result is None and not getattr(self, "_loaded", False):
            warnings.warn(
                "this model was never trained: its representations are those of random weights (call .train() first)",
                stacklevel=2,
            )
        levels = encode_in_batches(self.module.to(device), counts, batch_size=batch_size, device=device)
        if level == "all":
            return dict(enumerate(levels))
        if isinstance(level, bool) or not isinstance(level, int) or not -len(levels) <= level < len(levels):
            raise ValueError(f"level must be 0..{len(levels) - 1} or 'all', got {level!r}")
        return levels[level]

    def map_query(
        self,
        adata,
        index,
        labels=(),
        k: int = 15,
        levels=None,
        atlas_obs: str | None = None,
        layer: str | None = None,
        batch_size: int = 4096,
    ):
        """Map the cells of ``adata`` to an embedded atlas (``index``: an index built by
        ``hvae-pipeline index``, or the store it sits beside) at every level: in ``adata.obs`` each
        atlas label column transferred by the vote of the ``k`` nearest atlas cells
        (``<label>_level_<l>``, ``<label>_level_<l>_confidence``) and ``unlike_level_<l>``; in
        ``adata.obsm`` the representations and the neighbours (store rows) and their distances.
        The atlas must have been embedded by this model (the one saved or loaded). Returns ``adata``."""
        from .query import AtlasLabels, IndexMismatch, map_levels
        from .query.transfer import attach, check_embedded_by, check_k, open_atlas

        atlas, index_path, wanted = open_atlas(index, levels)
        check_k(atlas, k)
        if getattr(self, "model_id", None) is None:
            raise IndexMismatch(
                "this model's weights are not those of a saved checkpoint: save it (HVAEModel.save) and "
                "embed the atlas with it, or load the model that embedded the atlas (HVAEModel.load)"
            )
        check_embedded_by(atlas, self.model_id, "this model")
        atlas_labels = AtlasLabels(atlas, list(labels), atlas_obs) if labels else None
        representations = self.get_latent_representation(adata, level="all", batch_size=batch_size, layer=layer)
        mapped = map_levels(atlas, {level: representations[level] for level in wanted}, atlas_labels, k)
        attach(
            adata,
            mapped,
            {
                "index": index_path,
                "store": atlas.store,
                "model_id": self.model_id,
                "k": k,
                "labels": list(labels),
                "levels": wanted,
            },
        )
        return adata

    def _aligned(self, adata, layer):
        ids, used = _var_ids(adata, layer, self.gene_column)
        alignment = GeneAlignment(ids, self.feature_ids, source_name="adata", id_note=gene_id_note(used))
        print(f"genes: {alignment.summary()}")
        return alignment.apply(_counts(adata, layer))

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write a checkpoint that ``hvae-pipeline embed --checkpoint DIR`` and ``HVAEModel.load``
        take (``model.pt`` with the gene ids and symbols, genes.json, batches.json)."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            if not (directory / "model.pt").exists():
                raise FileExistsError(f"{directory} exists and is not a checkpoint; choose another directory")
            if not overwrite:
                raise FileExistsError(f"{directory} already holds a checkpoint; pass overwrite=True to replace it")
        steps = self.result.steps if self.result is not None else 0
        if self.result is None and not getattr(self, "_loaded", False):
            warnings.warn(
                "saving a model that was never trained: its representations are those of random weights "
                "(call .train() first)",
                stacklevel=2,
            )
        setup = {
            "layer": self.layer,
            "gene_column": self.gene_column,
            "n_top_genes": self.n_top_genes,
            "batch_key": self.batch_key,
        }
        written = save_checkpoint(
            directory,
            self.module,
            self.config,
            None,
            {"step": steps, "finished": True},
            self.feature_ids,
            self.batch_key,
            self.batch_categories,
            feature_names=self.feature_names,
            setup=setup,
        )
        self.model_id = model_id(Path(written))
        return written

    @classmethod
    def load(cls, directory: str | Path, adata=None) -> "HVAEModel":
        """A model from any checkpoint ``train`` or ``save`` wrote (a checkpoint or run directory).

        The AnnData setup that ``save`` recorded (the counts layer, the gene id column, the genes,
        the batch key and its categories) comes back with it: ``get_latent_representation(adata)``
        reads an AnnData laid out as the training one without being told again. ``adata``: cells
        to bind now (``get_latent_representation()`` then encodes them); batches unseen in
        training are reported (the representations do not read batches)."""
        found = find_checkpoint(directory)
        if found is None:
            raise FileNotFoundError(f"{directory} is neither a checkpoint directory nor a run directory with one")
        module, parts = load_model(found)
        setup = parts.get("setup") or {}
        self = cls.__new__(cls)
        self.layer, self.gene_column, self.result = setup.get("layer"), setup.get("gene_column"), None
        self.n_top_genes = setup.get("n_top_genes")
        self.batch_key, self.batch_categories = parts["batches"]["batch_key"], list(parts["batches"]["categories"])
        self.feature_ids = list(parts["genes"]["feature_ids"])
        self.feature_names = list(parts["genes"].get("feature_names", self.feature_ids))
        self.config, self.module, self._counts, self._batch_index = module.config, module, None, None
        self._loaded = True
        self.model_id = model_id(Path(found)) if not isinstance(found, str) else None
        if adata is not None:
            self._counts = self._aligned(adata, self.layer)
            self._batch_index = self._known_batches(adata)
        return self

    def _known_batches(self, adata) -> np.ndarray | None:
        """The recorded batch codes of ``adata``'s cells, or None (with a note) where it has no batch
        column or batches unseen in training: such cells are embedded, not trained on."""
        if self.batch_key is None:
            return None
        if self.batch_key not in adata.obs.columns:
            print(
                f"note: obs has no batch column {self.batch_key!r}: the cells are embedded (the encoder reads no "
                "batch) but cannot be trained on"
            )
            return None
        values = adata.obs[self.batch_key].astype(str).to_numpy()
        codes = pd.Categorical(values, categories=self.batch_categories).codes
        if (codes < 0).any():
            unseen = pd.unique(values[codes < 0])
            print(
                f"note: {int((codes < 0).sum()):,} cells of {len(unseen)} {self.batch_key} value(s) unseen in training "
                f"(e.g. {list(unseen[:3])}): embedded as any other cell (the encoder reads no batch); not trained on"
            )
            return None
        return codes.astype(np.int64)

    def __repr__(self) -> str:
        trained = f"trained {self.result.steps} steps" if self.result is not None else "untrained or loaded"
        return (
            f"HVAEModel({self.config.n_genes} genes, levels {self.config.latent_dims} "
            f"(exported {self.config.representation_dims}), {len(self.batch_categories)} batches, {trained})"
        )


def _check_batch_column(obs: pd.DataFrame, batch_key: str | None) -> None:
    """A batch column names batches: missing values, continuous numbers and ids (one batch per
    cell) are refused here, not inside ``train()``."""
    if batch_key is None or batch_key not in obs.columns:
        return  # batch_codes names a missing column
    column = obs[batch_key]
    if column.isna().any():
        rows = list(obs.index[column.isna()][:3])
        raise ValueError(
            f"batch_key {batch_key!r} is missing for {int(column.isna().sum()):,} cells (e.g. {rows}); fill "
            "them (e.g. 'unknown') or drop those cells"
        )
    numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
    if numeric and column.nunique() > max(50, len(column) // 10):
        raise ValueError(
            f"batch_key {batch_key!r} holds continuous numbers ({column.nunique():,} distinct values over "
            f"{len(column):,} cells): each would be its own batch; pass a categorical column (donor, sample)"
        )
    if column.nunique() > max(50, len(column) // 2):
        raise ValueError(
            f"batch_key {batch_key!r} has {column.nunique():,} distinct values over {len(column):,} cells: "
            "nearly one batch per cell (an id?); pass a column of batches (donor, sample)"
        )


def _matrix(adata, layer):
    if layer in (None, "X"):
        return adata.X
    if layer == "raw":
        if adata.raw is None:
            raise ValueError("layer='raw' but the AnnData has no .raw")
        return adata.raw.X
    if layer not in adata.layers:
        raise KeyError(f"no layer {layer!r} in the AnnData (layers: {list(adata.layers.keys())})")
    return adata.layers[layer]


def _counts(adata, layer) -> sp.csr_matrix:
    """The counts as CSR float32 (a backed matrix read in row blocks), checked to be raw counts:
    the error names the layer that holds them when X is normalised."""
    matrix = _matrix(adata, layer)
    if sp.issparse(matrix) or isinstance(matrix, np.ndarray):
        counts = sp.csr_matrix(matrix, dtype=np.float32)
    else:  # backed: h5py datasets / anndata sparse datasets
        blocks = [sp.csr_matrix(matrix[start : start + 16_384]) for start in range(0, adata.n_obs, 16_384)]
        counts = sp.vstack(blocks, format="csr").astype(np.float32)
    values = counts.data
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        where = "X" if layer in (None, "X") else f"layer {layer!r}"
        hint = _count_layers(adata)
        raise ValueError(
            f"{where} does not hold raw counts ({int(bad.sum()):,} entries are negative, non-integer or not "
            f"finite, e.g. {float(values[bad][0])!r}); the model needs raw integer counts"
            + (f": they look to be in {hint}, pass layer={hint[0]!r}" if hint else "")
        )
    return counts


def _count_layers(adata) -> list[str]:
    """Layers (and raw) that hold integer counts, in the layer= spelling."""
    found = []
    candidates = [(name, adata.layers[name]) for name in adata.layers.keys()]
    if adata.raw is not None:
        candidates.append(("raw", adata.raw.X))
    for name, matrix in candidates:
        try:
            sample = matrix[: min(200, adata.n_obs)]
            sample = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
        except Exception:  # noqa: BLE001 - an unreadable layer is not a candidate
            continue
        if looks_like_counts(sample):
            found.append(name)
    return found


def _var_ids(adata, layer, gene_column) -> tuple[np.ndarray, str]:
    var = adata.raw.var if layer == "raw" else adata.var
    ids, used = gene_ids_of(var, gene_column, where="adata.var")
    index = pd.Index(ids)
    if index.has_duplicates:
        duplicated = index[index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"gene ids in {used} are not unique (e.g. {duplicated}); pass gene_column= naming unique ids")
    return ids, used


def _var_names(adata, layer) -> np.ndarray:
    var = adata.raw.var if layer == "raw" else adata.var
    for column in ("feature_name", "gene_symbol", "gene_symbols", "gene_name"):
        if column in var.columns:
            return var[column].astype(str).to_numpy(dtype=object)
    return var.index.astype(str).to_numpy(dtype=object)


__all__ = ["HVAEModel"]
