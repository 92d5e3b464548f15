"""A synthetic single-cell atlas with a known cell-type tree, donors and realistic counts.

Generative story (all in log space, then negative binomial counts, like 10x UMI data):

    log rate[cell, gene] = base[gene]                       heavy-tailed gene abundances
                         + sum of program effects along the cell's path in the tree
                           (lineage -> cell type -> subtype; each node perturbs a sparse
                            random subset of genes, stronger near the root)
                         + donor effect (low rank, shared genes shift together)
                         + continuous within-type variation (low rank, e.g. cycling)
    expression share = softmax over genes;  library ~ log-normal (donor-shifted)
    counts ~ NB(mean = library * share, theta[gene])  (Gamma-Poisson)

Cells are generated in blocks, each from its own seeded stream, so any block can be
regenerated alone, the output is identical for a given seed whatever the block size used to
write it, and 10 million cells stream to disk in constant memory. Donors are contiguous in
row order (as in an atlas built dataset by dataset) unless ``donor_contiguous=False``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

LABEL_NAMES_3 = ("lineage", "cell_type", "subtype")
GENERATOR_VERSION = 1
# Random streams are per chunk of this many rows: output does not depend on block size.
RNG_CHUNK = 1024


@dataclass(frozen=True)
class SyntheticAtlasSpec:
    """Everything that determines a synthetic atlas. Same spec, same cells, bit for bit."""

    n_cells: int = 10_000
    n_genes: int = 2_000
    branching: tuple[int, ...] = (3, 3, 3)
    n_donors: int = 8
    seed: int = 0
    # Mean UMIs per cell over the panel; None: 0.75 per gene (1,500 for 2,000 genes), which
    # keeps ~80-85% zeros whatever the panel size, as in 10x data restricted to HVGs.
    mean_library_size: float | None = None
    library_log_sd: float = 0.45
    donor_library_log_sd: float = 0.2
    gene_abundance_sd: float = 2.2
    effect_sd: tuple[float, ...] = (1.5, 1.2, 1.2)
    program_fraction: tuple[float, ...] = (0.08, 0.05, 0.05)
    donor_effect_sd: float = 0.3
    n_donor_factors: int = 4
    cell_variation_sd: float = 0.3
    n_cell_factors: int = 3
    mean_theta: float = 3.0
    composition_concentration: float = 3.0
    donor_contiguous: bool = True
    block_size: int = 4_096

    def __post_init__(self) -> None:
        for name in ("branching", "effect_sd", "program_fraction"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        depth = len(self.branching)
        if self.n_cells < 1 or self.n_genes < 1 or self.n_donors < 1 or self.block_size < 1:
            raise ValueError("n_cells, n_genes, n_donors and block_size must be >= 1")
        if depth < 1 or any(b < 1 for b in self.branching):
            raise ValueError(f"branching must be positive integers per tree level, got {self.branching}")
        if self.mean_library_size is None:
            object.__setattr__(self, "mean_library_size", 0.75 * self.n_genes)
        for name in ("effect_sd", "program_fraction"):
            if len(getattr(self, name)) != depth:
                raise ValueError(f"{name} needs one value per tree level ({depth}), got {getattr(self, name)}")

    @property
    def label_names(self) -> tuple[str, ...]:
        """obs column of each tree level, coarsest first."""
        if len(self.branching) == 3:
            return LABEL_NAMES_3
        return tuple(f"level_{k}" for k in range(len(self.branching)))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class SyntheticAtlas:
    """Deterministic generator of a :class:`SyntheticAtlasSpec`.

    >>> atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=1000, n_genes=200))
    >>> counts, obs = atlas.block(0)          # CSR float32 (cells, genes), labelled obs
    >>> atlas.write_zarr("atlas.zarr")        # streamed, constant memory
    """

    def __init__(self, spec: SyntheticAtlasSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        genes = spec.n_genes
        self.gene_ids = np.array([f"SYNG{i:06d}" for i in range(genes)], dtype=object)

        # Tree: node paths are tuples of child indices; leaves enumerate the finest types.
        self.leaf_paths = list(np.ndindex(*spec.branching))
        base = rng.normal(0.0, spec.gene_abundance_sd, genes)
        profiles = np.tile(base, (len(self.leaf_paths), 1))
        effects: dict[tuple[int, ...], np.ndarray] = {}
        for depth, n_children in enumerate(spec.branching):
            for path in {p[: depth + 1] for p in self.leaf_paths}:
                program = rng.random(genes) < spec.program_fraction[depth]
                effects[path] = np.where(program, rng.normal(0.0, spec.effect_sd[depth], genes), 0.0)
        for leaf, path in enumerate(self.leaf_paths):
            for depth in range(len(path)):
                profiles[leaf] += effects[path[: depth + 1]]
        self.leaf_log_profiles = profiles.astype(np.float32)  # (leaves, genes)

        self.donor_loadings = (rng.normal(0, 1, (spec.n_donor_factors, genes)) / math.sqrt(spec.n_donor_factors)).astype(np.float32)
        self.cell_loadings = (rng.normal(0, 1, (spec.n_cell_factors, genes)) / math.sqrt(spec.n_cell_factors)).astype(np.float32)
        self.theta = np.exp(rng.normal(math.log(spec.mean_theta), 0.5, genes)).astype(np.float32)
        # Global leaf frequencies (some types are rare) that each donor perturbs.
        self.leaf_frequencies = rng.dirichlet(np.full(len(self.leaf_paths), 2.0))

        self.category_names = [
            sorted({_node_name(p[: depth + 1]) for p in self.leaf_paths}, key=_natural_key)
            for depth in range(len(spec.branching))
        ]
        # leaf_codes[depth][leaf]: the category code of that leaf's ancestor at `depth`.
        self.leaf_codes = [
            np.array([names.index(_node_name(path[: depth + 1])) for path in self.leaf_paths])
            for depth, names in enumerate(self.category_names)
        ]
        self.donor_names = [f"donor_{d:05d}" for d in range(spec.n_donors)]
        self._donor_cache: dict[int, tuple] = {}

    # ------------------------------------------------------------------ per-donor state
    def _donor(self, donor: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(leaf probabilities, (genes,) log shift, log library shift) of one donor."""
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 1, donor])
        probabilities = rng.dirichlet(spec.composition_concentration * len(self.leaf_paths) * self.leaf_frequencies + 1e-3)
        shift = rng.normal(0, spec.donor_effect_sd, spec.n_donor_factors).astype(np.float32) @ self.donor_loadings
        return probabilities, shift, float(rng.normal(0, spec.donor_library_log_sd))

    # ------------------------------------------------------------------ blocks
    @property
    def n_blocks(self) -> int:
        return math.ceil(self.spec.n_cells / self.spec.block_size)

    def donors_of(self, rows: np.ndarray) -> np.ndarray:
        spec = self.spec
        if spec.donor_contiguous:
            return (rows.astype(np.int64) * spec.n_donors) // spec.n_cells
        # A fixed hash of the row: stable whatever the block size.
        return _splitmix(rows.astype(np.uint64) ^ np.uint64(spec.seed)) % np.uint64(spec.n_donors)

    def block(self, index: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Cells ``[index * block_size, ...)``: CSR float32 counts and their obs frame."""
        spec = self.spec
        if not 0 <= index < self.n_blocks:
            raise IndexError(f"block {index} out of range (the atlas has {self.n_blocks} blocks)")
        start = index * spec.block_size
        stop = min(start + spec.block_size, spec.n_cells)
        return self.rows(start, stop)

    def rows(self, start: int, stop: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Cells ``[start, stop)`` as CSR float32 counts and their obs frame.

        Randomness is drawn per fixed chunk of ``RNG_CHUNK`` rows, so a cell's values depend
        only on the spec and its row, never on how rows are grouped into blocks.
        """
        spec = self.spec
        if not 0 <= start <= stop <= spec.n_cells:
            raise IndexError(f"rows [{start}, {stop}) out of range (the atlas has {spec.n_cells} cells)")
        parts, leaves, donors = [], [], []
        for chunk in range(start // RNG_CHUNK, (stop - 1) // RNG_CHUNK + 1 if stop > start else start // RNG_CHUNK):
            counts, chunk_leaves, chunk_donors = self._chunk(chunk)
            lo = max(start - chunk * RNG_CHUNK, 0)
            hi = min(stop - chunk * RNG_CHUNK, counts.shape[0])
            parts.append(counts[lo:hi])
            leaves.append(chunk_leaves[lo:hi])
            donors.append(chunk_donors[lo:hi])
        if not parts:
            empty = sp.csr_matrix((0, spec.n_genes), dtype=np.float32)
            return empty, self._obs(np.arange(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
        counts = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        return counts, self._obs(np.arange(start, stop), np.concatenate(leaves), np.concatenate(donors))

    def _chunk(self, chunk: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        """Counts, leaf index and donor index of rows ``[chunk * RNG_CHUNK, ...)``."""
        spec = self.spec
        rows = np.arange(chunk * RNG_CHUNK, min((chunk + 1) * RNG_CHUNK, spec.n_cells))
        n = len(rows)
        rng = np.random.default_rng([spec.seed, 2, chunk])
        uniforms = rng.random(n)
        library_noise = rng.normal(0.0, spec.library_log_sd, n)
        cell_scores = rng.normal(0.0, spec.cell_variation_sd, (n, spec.n_cell_factors)).astype(np.float32)
        log_rate = cell_scores @ self.cell_loadings  # (cells, genes) float32
        donors = self.donors_of(rows).astype(np.int64)
        leaves = self._leaves(donors, uniforms)
        log_library = np.empty(n, dtype=np.float64)
        for donor in np.unique(donors):
            _, shift, library_shift = self._donor_cached(int(donor))
            mask = donors == donor
            log_rate[mask] += shift
            log_library[mask] = math.log(spec.mean_library_size) + library_shift + library_noise[mask]
        log_rate += self.leaf_log_profiles[leaves]
        # NB means: softmax over genes times the library size, computed in place.
        log_rate -= log_rate.max(axis=1, keepdims=True)
        np.exp(log_rate, out=log_rate)
        log_rate *= (np.exp(log_library) / log_rate.sum(axis=1, dtype=np.float64)).astype(np.float32)[:, None]
        # Gamma-Poisson: rate = mean * Gamma(theta, 1) / theta.
        rate = rng.standard_gamma(np.broadcast_to(self.theta, log_rate.shape), dtype=np.float32)
        rate *= log_rate
        rate /= self.theta
        values = rng.poisson(rate).astype(np.float32)
        return sp.csr_matrix(values), leaves, donors

    def _leaves(self, donors: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Leaf (finest type) of each cell from its donor's composition and a uniform draw."""
        leaves = np.empty(len(donors), dtype=np.int64)
        for donor in np.unique(donors):
            cumulative = np.cumsum(self._donor_cached(int(donor))[0])
            mask = donors == donor
            leaves[mask] = np.minimum(np.searchsorted(cumulative, uniforms[mask], side="right"), len(cumulative) - 1)
        return leaves

    def obs_rows(self, start: int, stop: int) -> pd.DataFrame:
        """The obs frame of cells ``[start, stop)`` without generating their counts (the labels
        come from the first draw of each row chunk's generator, exactly as in ``rows``)."""
        frames = []
        for chunk in range(start // RNG_CHUNK, -(-stop // RNG_CHUNK)):
            rows = np.arange(chunk * RNG_CHUNK, min((chunk + 1) * RNG_CHUNK, self.spec.n_cells))
            uniforms = np.random.default_rng([self.spec.seed, 2, chunk]).random(len(rows))
            donors = self.donors_of(rows).astype(np.int64)
            keep = (rows >= start) & (rows < stop)
            frames.append(self._obs(rows[keep], self._leaves(donors, uniforms)[keep], donors[keep]))
        return pd.concat(frames) if frames else self._obs(np.arange(0), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def _donor_cached(self, donor: int):
        if donor not in self._donor_cache:
            if len(self._donor_cache) > 4096:
                self._donor_cache.clear()
            self._donor_cache[donor] = self._donor(donor)
        return self._donor_cache[donor]

    def _obs(self, rows: np.ndarray, leaves: np.ndarray, donors: np.ndarray) -> pd.DataFrame:
        columns = {}
        for depth, name in enumerate(self.spec.label_names):
            columns[name] = pd.Categorical.from_codes(self.leaf_codes[depth][leaves], self.category_names[depth])
        columns["donor_id"] = pd.Categorical.from_codes(donors, self.donor_names)
        return pd.DataFrame(columns, index=pd.Index([f"cell_{r:09d}" for r in rows], dtype=object))

    def iter_blocks(self) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        for index in range(self.n_blocks):
            yield self.block(index)

    # ------------------------------------------------------------------ outputs
    def var(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"feature_id": self.gene_ids, "feature_name": [g.replace("SYNG", "SynGene") for g in self.gene_ids]},
            index=pd.Index(self.gene_ids, dtype=object),
        )

    def provenance(self) -> dict:
        return {"generator": "pipeline.data.synthetic", "generator_version": GENERATOR_VERSION, "spec": self.spec.to_dict()}

    def to_anndata(self):
        """The whole atlas in memory (small atlases only)."""
        import anndata as ad

        blocks = list(self.iter_blocks())
        adata = ad.AnnData(
            X=sp.vstack([b[0] for b in blocks]).tocsr(),
            obs=pd.concat([b[1] for b in blocks]),
            var=self.var(),
        )
        adata.uns["provenance"] = json.dumps(self.provenance())
        return adata


def _node_name(path: tuple[int, ...]) -> str:
    """(0, 1, 2) -> 'L1.T2.S3': lineage 1, its type 2, that type's subtype 3."""
    prefixes = "LTS" if len(path) <= 3 else "N" * len(path)
    return ".".join(f"{prefixes[depth] if len(prefixes) > depth else 'N'}{i + 1}" for depth, i in enumerate(path))


def _natural_key(name: str) -> list:
    return [int(part[1:]) for part in name.split(".")]


def _splitmix(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a fixed, well-mixed hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def write_synthetic_atlas(spec: SyntheticAtlasSpec, path: str | Path, progress: bool = True) -> Path:
    """Stream a synthetic atlas to ``path`` (.h5ad or .zarr) block by block; returns the path."""
    from tqdm.auto import tqdm

    from .anndata_stream import AnnDataStreamWriter

    atlas = SyntheticAtlas(spec)
    with AnnDataStreamWriter(path, atlas.var(), uns={"provenance": atlas.provenance()}) as writer:
        with tqdm(total=spec.n_cells, unit="cells", unit_scale=True, disable=not progress, desc="synthetic atlas") as bar:
            for counts, obs in atlas.iter_blocks():
                writer.append(counts, obs)
                bar.update(counts.shape[0])
    return Path(path)
