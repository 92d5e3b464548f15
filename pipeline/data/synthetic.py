"""A synthetic single-cell atlas with a known cell-type tree, donors and realistic counts.

Generative story (all in log space, then negative binomial counts, like 10x UMI data):

    log rate[cell, gene] = base[gene]                       heavy-tailed gene abundances
                         + sum of program effects along the cell's path in the tree
                           (lineage -> cell type -> subtype; each node perturbs a sparse
                            random subset of genes, stronger near the root)
                         + donor effect (low rank, shared genes shift together)
                         + continuous within-type variation (low rank, e.g. cycling)
    expression share = softmax over genes;  library ~ log-normal (donor-shifted)
    counts ~ NB(mean = library * share, theta[gene])

The NB draw is sparse (``negative_binomial_csr``): P(0) for every entry in one vectorised pass,
then a compiled pass (numba) that keeps the ~20% non-zero entries and inverts their CDF, so the
cost is the entries plus the UMIs, not a Gamma and a Poisson draw per entry (version 1). Chunks of
1,024 rows are generated on up to two threads; about 40k cells/s at 2,000 genes on 2 cores.

Cells are generated in blocks, each from its own seeded stream, so any block can be
regenerated alone, the output is identical for a given seed whatever the block size used to
write it, and 10 million cells stream to disk in constant memory. Donors are contiguous in
row order (as in an atlas built dataset by dataset) unless ``donor_contiguous=False``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .shard_format import splitmix64

LABEL_NAMES_3 = ("lineage", "cell_type", "subtype")
# 2: counts drawn by negative_binomial_csr (same distribution as 1's Gamma-Poisson, other values).
GENERATOR_VERSION = 2
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

    def __init__(self, spec: SyntheticAtlasSpec, threads: int | None = None) -> None:
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

        self.donor_loadings = (
            rng.normal(0, 1, (spec.n_donor_factors, genes)) / math.sqrt(spec.n_donor_factors)
        ).astype(np.float32)
        self.cell_loadings = (rng.normal(0, 1, (spec.n_cell_factors, genes)) / math.sqrt(spec.n_cell_factors)).astype(
            np.float32
        )
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
        self.threads = threads if threads is not None else min(2, os.cpu_count() or 1)
        self._pool = None

    # ------------------------------------------------------------------ per-donor state
    def _donor(self, donor: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(leaf probabilities, (genes,) log shift, log library shift) of one donor."""
        spec = self.spec
        rng = np.random.default_rng([spec.seed, 1, donor])
        probabilities = rng.dirichlet(
            spec.composition_concentration * len(self.leaf_paths) * self.leaf_frequencies + 1e-3
        )
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
        return splitmix64(rows.astype(np.uint64) ^ np.uint64(spec.seed)) % np.uint64(spec.n_donors)

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
        chunks = range(start // RNG_CHUNK, (stop - 1) // RNG_CHUNK + 1 if stop > start else start // RNG_CHUNK)
        for chunk, (counts, chunk_leaves, chunk_donors) in zip(chunks, self._map(self._chunk, chunks), strict=True):
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
        rng = np.random.default_rng([self.spec.seed, 2, chunk])
        work = _workspace(self.spec.n_genes)
        mean, leaves, donors = self._chunk_means(chunk, rng, work)
        return negative_binomial_csr(rng, mean, self.theta, work), leaves, donors

    def _chunk_means(
        self, chunk: int, rng: np.random.Generator, work: "_Workspace | None" = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """NB means (cells, genes) float32, leaf and donor of the chunk's rows; draws from ``rng``.
        The means are written into ``work`` (per-thread buffers reused chunk after chunk)."""
        spec = self.spec
        work = work or _Workspace(spec.n_genes)
        rows = np.arange(chunk * RNG_CHUNK, min((chunk + 1) * RNG_CHUNK, spec.n_cells))
        n = len(rows)
        uniforms = rng.random(n)
        library_noise = rng.normal(0.0, spec.library_log_sd, n)
        cell_scores = rng.normal(0.0, spec.cell_variation_sd, (n, spec.n_cell_factors)).astype(np.float32)
        donors = self.donors_of(rows).astype(np.int64)
        leaves = self._leaves(donors, uniforms)
        present, donor_of_row = np.unique(donors, return_inverse=True)
        shifts = np.empty((len(present), spec.n_genes), np.float32)
        log_library = np.empty(n, dtype=np.float64)
        for k, donor in enumerate(present):
            _, shifts[k], library_shift = self._donor_cached(int(donor))
            mask = donor_of_row == k
            log_library[mask] = math.log(spec.mean_library_size) + library_shift + library_noise[mask]
        log_rate = work.a[:n]
        _log_rates(cell_scores, self.cell_loadings, self.leaf_log_profiles, leaves, shifts, donor_of_row, log_rate)
        # NB means: softmax over genes (rows already less their max) times the library size, in place.
        np.exp(log_rate, out=log_rate)
        log_rate *= (np.exp(log_library) / log_rate.sum(axis=1, dtype=np.float64)).astype(np.float32)[:, None]
        return log_rate, leaves, donors

    def _map(self, function, chunks: range):
        """``function`` over row chunks, on up to ``threads`` threads (numpy and the compiled NB
        draw release the GIL); results in chunk order, so threads never change the output."""
        if self.threads <= 1 or len(chunks) <= 1:
            return map(function, chunks)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="synthetic")
        return self._pool.map(function, chunks)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}

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
        return {
            "generator": "pipeline.data.synthetic",
            "generator_version": GENERATOR_VERSION,
            "spec": self.spec.to_dict(),
        }

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


def negative_binomial_csr(
    rng: np.random.Generator, mean: np.ndarray, theta: np.ndarray, work: "_Workspace | None" = None
) -> sp.csr_matrix:
    """NB(mean, theta) counts (E = mean, Var = mean + mean^2 / theta) as CSR float32.

    Sparse, by inversion: P(0) = (1 + mean / theta)^-theta in one vectorised pass; a compiled
    pass draws one uniform per entry (a counter-based hash of the entry, keyed from ``rng``), keeps
    the ~20% at or above P(0) and walks their CDF, P(k + 1) = P(k) (k + theta) / (k + 1) mean /
    (mean + theta), so the work is the entries plus the UMI total. The same distribution as a Gamma
    and a Poisson draw per entry (generator version 1) up to float32 rounding of P(0), ~10x faster.
    """
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    theta = np.ascontiguousarray(theta, dtype=np.float32)
    n, genes = mean.shape
    if work is None or work.a.shape[0] < n or work.genes != genes:
        work = _Workspace(genes, n)
    p0 = np.divide(mean, theta, out=work.c[:n])
    np.log1p(p0, out=p0)
    p0 *= -theta
    np.exp(p0, out=p0)
    row_nnz = np.empty(n, np.int64)
    key = np.uint64(rng.integers(0, 2**63, dtype=np.int64))
    nnz = _nb_invert(mean, theta, p0, key, work.data, work.indices, row_nnz)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    return sp.csr_matrix((work.data[:nnz].copy(), work.indices[:nnz].copy(), indptr), shape=(n, genes))


class _Workspace:
    """Buffers of one thread's chunk: reused, so a chunk costs no fresh pages (page faults of
    fresh 8 MB arrays serialise threads on the process's memory map)."""

    def __init__(self, genes: int, rows: int = RNG_CHUNK) -> None:
        self.genes = genes
        self.a, self.c = np.empty((rows, genes), np.float32), np.empty((rows, genes), np.float32)
        self.data, self.indices = np.empty(rows * genes, np.float32), np.empty(rows * genes, np.int32)


_THREAD_STATE = threading.local()


def _workspace(genes: int) -> _Workspace:
    work = getattr(_THREAD_STATE, "work", None)
    if work is None or work.genes != genes:
        work = _THREAD_STATE.work = _Workspace(genes)
    return work


@numba.njit(nogil=True, cache=True, fastmath=True)
def _log_rates(scores, loadings, profiles, leaves, shifts, donor_of_row, out):  # pragma: no cover (compiled)
    """out[i] = scores[i] @ loadings + profiles[leaves[i]] + shifts[donor_of_row[i]], less its max."""
    n, genes = out.shape
    factors = loadings.shape[0]
    for i in range(n):
        row = out[i]
        profile = profiles[leaves[i]]
        shift = shifts[donor_of_row[i]]
        for j in range(genes):
            row[j] = profile[j] + shift[j]
        for f in range(factors):
            score = scores[i, f]
            loading = loadings[f]
            for j in range(genes):
                row[j] += score * loading[j]
        top = row[0]
        for j in range(genes):
            top = max(top, row[j])
        for j in range(genes):
            row[j] -= top


@numba.njit(nogil=True, cache=True)
def _uniform(key, entry):  # pragma: no cover (compiled)
    """A uniform in [0, 1) from (key, entry): SplitMix64's finaliser, 53 bits."""
    z = key + (entry + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True, cache=True)
def _nb_invert(mean, theta, p0, key, data, indices, row_nnz):  # pragma: no cover (compiled)
    """Compiled core of :func:`negative_binomial_csr`; returns the number of non-zero entries."""
    n, genes = mean.shape
    nnz = 0
    for i in range(n):
        start = nnz
        base = np.uint64(i) * np.uint64(genes)
        for j in range(genes):  # branch-free compaction of the non-zero entries
            indices[nnz] = j
            nnz += _uniform(key, base + np.uint64(j)) >= p0[i, j]
        for e in range(start, nnz):
            j = indices[e]
            x = _uniform(key, base + np.uint64(j))
            p = np.float64(p0[i, j])
            m = np.float64(mean[i, j])
            t = np.float64(theta[j])
            q = m / (m + t)
            c = (t - 1.0) * q
            cdf, k = p, 0
            # P(k + 1) / P(k) = q + c / (k + 1).
            # The limit of cdf is 1 up to P(0)'s float32 rounding: the bound ends the rare walk
            # whose uniform lies in that sliver (probability ~1e-7 an entry).
            limit = 50.0 * m + 1000.0
            while True:
                p *= q + c * (1.0 / (k + 1.0))
                k += 1
                cdf += p
                if x < cdf or k >= limit:
                    break
            data[e] = k
        row_nnz[i] = nnz - start
    return nnz


def _node_name(path: tuple[int, ...]) -> str:
    """(0, 1, 2) -> 'L1.T2.S3': lineage 1, its type 2, that type's subtype 3."""
    prefixes = "LTS" if len(path) <= 3 else "N" * len(path)
    return ".".join(f"{prefixes[depth] if len(prefixes) > depth else 'N'}{i + 1}" for depth, i in enumerate(path))


def _natural_key(name: str) -> list:
    return [int(part[1:]) for part in name.split(".")]


def write_synthetic_atlas(spec: SyntheticAtlasSpec, path: str | Path, progress: bool = True) -> Path:
    """Stream a synthetic atlas to ``path`` (.h5ad or .zarr) block by block; returns the path."""
    from ..progress import Progress
    from .anndata_stream import AnnDataStreamWriter

    atlas = SyntheticAtlas(spec)
    with AnnDataStreamWriter(path, atlas.var(), uns={"provenance": atlas.provenance()}) as writer:
        with Progress(spec.n_cells, "synthetic atlas", enabled=progress) as bar:
            for counts, obs in atlas.iter_blocks():
                writer.append(counts, obs)
                bar.update(counts.shape[0])
    return Path(path)
