"""Top-down hierarchical VAE for single-cell counts (ladder / NVAE style).

Notation (L levels, level 0 next to the data, level L-1 the top):

    bottom-up   r_l = block_l(stem(log1p(x / library * target)))   every level one block from the data
                (in training x is thinned: a binomial share of each cell's molecules, drawn per
                cell from U(1 - molecule_thinning, 1); the likelihood scores every molecule)
    top         q(z_{L-1} | x) = N(head(r_{L-1})),   p(z_{L-1}) = N(0, I)
    top-down    h_{L-1} = W_{L-1} z_{L-1}
                s_l = block(h_{l+1})                         (shared by prior and posterior)
                p(z_l | z_{>l})    = N(mu_p(s_l), sigma_p(s_l))
                q(z_l | z_{>l}, x) = N(mu_p + dmu(s_l, r_l), sigma_p * dsigma(s_l, r_l))
                h_l = s_l + W_l z_l
    decoder     x ~ NB(library * softmax(f([z_0, ..., z_{L-1}], batch)), theta)   (ZINB optional)
    read-out    standardise(log1p(x / library * target)) ~ N(g_batch * W [z_0, ..., z_{L-1}] + b_batch, I)
                (an auxiliary loss, weight ``readout_weight``)

The decoder reads every level's sample directly (LVAE/BIVA-style skip paths), so a lower level's
contribution is not drowned by the upper levels'. A level given a gene partition
(``HVAEConfig.gene_modules``, built by ``hvae.modules``) decodes only each cell's counts pooled over
its modules and feeds neither the decoder nor the read-out: what it holds reaches the genes only
through the priors of the levels below, so it can hold only what moves whole programmes of genes.
Upper levels without modules are pushed to the coarse structure by the *coarse reconstruction*: x
also decoded with the levels below some k at their prior means.

The *read-out* asks the code to predict every gene's standardised log expression with a linear map,
each gene counting alike (beside a per-batch gain and shift of each gene): the NB likelihood alone
lets a few abundant genes decide the code. What a level exports is what levels l..top predict
through it (``hvae.exports``). Why each piece is there, measured: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import exports
from .config import HVAEConfig
from .distributions import gaussian_kl, nb_log_prob, soft_clamp, zinb_log_prob
from .inputs import check_batch_index, check_counts
from .schedules import balanced_kl_coefficients


def _draw(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw of N(mean, exp(logvar))."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


@dataclass
class Walk:
    """One top-down pass (``HierarchicalVAE.walk``), level 0 first: each level's value, the
    log-variance of the distribution it came from (None where given or at the top), its KL per
    unit (training passes) and the top-down state after each level >= 1."""

    values: list
    logvars: list
    kl: list
    states_after: dict


@dataclass
class HVAEOutput:
    """What ``HierarchicalVAE.forward`` returns.

    Attributes:
        loss: scalar training objective: mean over cells of the negative ELBO with the
            KL weighted (warm-up, balancing, free bits) plus the weighted coarse
            reconstruction and read-out.
        reconstruction: (cells,) negative log-likelihood of the counts under the full
            posterior sample.
        kl: (n_levels,) mean KL per cell of each level, level 0 first (unweighted).
        coarse_reconstruction: scalar mean negative log-likelihood of the counts decoded
            from the upper levels alone (0 for a flat model or a zero weight).
        readout: scalar mean over cells of the read-out's squared error, half the sum over
            genes in units of each gene's standard deviation (0 for a zero weight).
        library: (cells,) observed library sizes.
        readout_moments: (3, genes) count, sum and sum of squares of the cells' log expression
            that the read-out standardised (None without a read-out). Library sizes and these
            moments enter the model's running statistics through
            :meth:`HierarchicalVAE.record_statistics`, after the step.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    coarse_reconstruction: torch.Tensor
    readout: torch.Tensor
    library: torch.Tensor
    readout_moments: torch.Tensor | None = None

    @property
    def negative_elbo(self) -> torch.Tensor:
        """Scalar mean negative ELBO per cell (KL unweighted), the number to compare runs by."""
        return self.reconstruction.mean() + self.kl.sum()


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: ``x + W2 silu(W1 LayerNorm(x))``. (cells, dim) -> same."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        # Small residual branches at initialisation keep deep stacks stable (NVAE, vdvae).
        with torch.no_grad():
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.dropout(F.silu(self.fc1(self.norm(x)))))


class GaussianHead(nn.Module):
    """Maps one or more states to (mean, log-variance) of a diagonal Gaussian.

    Each input gets its own LayerNorm before they are concatenated: the top-down state grows
    along the residual stream, and a joint norm would let it drown the bottom-up evidence in
    a posterior head. The log-variance is soft-clamped.
    """

    def __init__(self, in_dims: tuple[int, ...], latent_dim: int, log_scale_clamp: float, hidden: int | None = None):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in in_dims)
        width = sum(in_dims)
        self.hidden = nn.Sequential(nn.Linear(width, hidden), nn.SiLU()) if hidden else nn.Identity()
        self.out = nn.Linear(hidden or width, 2 * latent_dim)
        self.log_scale_clamp = log_scale_clamp
        with torch.no_grad():  # start near the prior / a zero residual
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([norm(t) for norm, t in zip(self.norms, inputs)], dim=-1)
        mean, logvar = self.out(self.hidden(x)).chunk(2, dim=-1)
        return mean, soft_clamp(logvar, self.log_scale_clamp)


class Readout(nn.Module):
    """The read-out: a linear map of every level's sample to each gene's standardised log
    expression, scored by squared error in units of the gene's standard deviation.

    Per batch a gain (log scale) and a shift of each gene stand beside the map: a donor's shift
    of a gene's log rate shows in log1p of normalised counts as a shift of abundant genes and a
    gain on sparse ones. With a shift alone the code carried the donors (synthetic_wide). Training
    standardises with the minibatch's moments and returns them (the training loop adds them to
    ``moments`` after the step, not for a skipped one); evaluation uses the running moments.
    """

    def __init__(self, config: HVAEConfig) -> None:
        super().__init__()
        n_genes = config.n_genes
        self.head = nn.Linear(sum(config.direct_dims), n_genes)
        self.batch_gain = nn.Embedding(config.n_batches, n_genes) if config.n_batches else None
        self.batch_shift = nn.Embedding(config.n_batches, n_genes) if config.n_batches else None
        for embedding in (self.batch_gain, self.batch_shift):
            if embedding is not None:
                nn.init.zeros_(embedding.weight)
        # Running (count, sum, sum of squares) of each gene's log expression.
        self.register_buffer("moments", torch.zeros(3, n_genes, dtype=torch.float64))

    def forward(
        self, code: torch.Tensor, expression: torch.Tensor, batch_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, (3, genes) count, sum and sum of squares of ``expression``)."""
        moments = (
            torch.stack(
                [torch.full_like(expression[0], expression.shape[0]), expression.sum(dim=0), (expression**2).sum(dim=0)]
            )
            .detach()
            .double()
        )
        count, total, total_sq = moments if self.training else self.moments
        count = count.clamp(min=1.0)
        mean = total / count
        var = (total_sq / count - mean**2).clamp(min=0.0)
        mean, var = mean.float(), var.float()
        target = ((expression - mean) * torch.rsqrt(var + 1e-5)).clamp(-10.0, 10.0)
        prediction = self.head(code).float()
        if self.batch_gain is not None:
            prediction = (
                prediction * torch.exp(self.batch_gain(batch_index).float()) + self.batch_shift(batch_index).float()
            )
        return 0.5 * ((prediction - target) ** 2).sum(dim=-1).mean(), moments


class Decoder(nn.Module):
    """NB (or ZINB) parameters from the samples of every level, with batch embeddings.

    (cells, sum(latent_dims)) every level's sample concatenated (level 0 first), (cells,)
    library, (cells,) batch index -> mean (cells, genes), theta (genes,) or (cells, genes), zero
    logits (cells, genes) or None. The embedding is injected into both layers (10^4 donors cost
    10^4 x embedding_dim parameters).
    """

    def __init__(self, config: HVAEConfig) -> None:
        super().__init__()
        hidden = config.hidden_dim
        n_embed = config.batch_embedding_dim if config.n_batches else 0
        self.batch_embedding = nn.Embedding(config.n_batches, n_embed) if config.n_batches else None
        # Every level has its own direct path into the decoder (LVAE/BIVA skip connections):
        # a lower level's signal is not drowned in the top-down residual stream.
        self.levels_in = nn.Linear(sum(config.direct_dims), hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden + n_embed, hidden)
        self.fc2 = nn.Linear(hidden + n_embed, hidden)
        self.scale_head = nn.Linear(hidden, config.n_genes)
        self.zero_head = nn.Linear(hidden, config.n_genes) if config.likelihood == "zinb" else None
        theta_rows = config.n_batches if config.dispersion == "gene-batch" else 1
        self.log_theta = nn.Parameter(torch.full((theta_rows, config.n_genes), math.log(5.0)))

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.norm(self.levels_in(z))
        if self.batch_embedding is not None:
            embedding = self.batch_embedding(batch_index).to(h.dtype)
            h = F.silu(self.fc1(torch.cat([h, embedding], dim=-1)))
            h = F.silu(self.fc2(torch.cat([h, embedding], dim=-1)))
        else:
            h = F.silu(self.fc2(F.silu(self.fc1(h))))
        # Softmax and everything after it in fp32: the scale of rare genes underflows in bf16.
        scale = torch.softmax(self.scale_head(h).float(), dim=-1)
        mean = scale * library.float().unsqueeze(1)
        log_theta = soft_clamp(self.log_theta, 12.0)
        theta = torch.exp(log_theta[batch_index] if log_theta.shape[0] > 1 else log_theta[0])
        zero_logits = self.zero_head(h).float() if self.zero_head is not None else None
        return mean, theta, zero_logits


class ModuleHead(nn.Module):
    """A coarse level's own target: each cell's counts pooled over gene modules, NB with a
    dispersion per module, decoded from that level's sample alone (with a donor's shift of each
    module beside it, as the gene decoder has its batch embedding). Returns the mean NLL."""

    def __init__(self, partition: tuple[int, ...], latent_dim: int, hidden: int, n_batches: int) -> None:
        super().__init__()
        n_modules = max(partition) + 1
        self.register_buffer("gene_module", torch.tensor(partition, dtype=torch.long))
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, n_modules))
        self.log_theta = nn.Parameter(torch.full((n_modules,), math.log(5.0)))
        self.batch_shift = nn.Embedding(n_batches, n_modules) if n_batches else None
        if self.batch_shift is not None:
            nn.init.zeros_(self.batch_shift.weight)

    def forward(self, sample: torch.Tensor, counts: torch.Tensor, library: torch.Tensor, batch_index) -> torch.Tensor:
        pooled = counts.new_zeros(counts.shape[0], self.log_theta.shape[0]).index_add_(1, self.gene_module, counts)
        logits = self.net(sample).float()
        if self.batch_shift is not None:
            logits = logits + self.batch_shift(batch_index).float()
        mean = torch.softmax(logits, dim=-1) * library.float().unsqueeze(1)
        return -nb_log_prob(pooled, mean, torch.exp(soft_clamp(self.log_theta, 12.0))).sum(dim=-1).mean()


class HierarchicalVAE(nn.Module):
    """Top-down hierarchical VAE with a negative binomial likelihood on raw counts."""

    def __init__(self, config: HVAEConfig) -> None:
        super().__init__()
        self.config = config
        hidden, dims, drop = config.hidden_dim, config.latent_dims, config.dropout
        clamp = config.log_scale_clamp
        n_levels = config.n_levels

        # Bottom-up deterministic path.
        self.stem = nn.Sequential(nn.Linear(config.n_genes, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Dropout(drop))
        self.bottom_up = nn.ModuleList(ResidualBlock(hidden, drop) for _ in range(n_levels))

        # Top-down path: the top posterior sees r_top; level l < top has a prior head on s_l
        # and a residual posterior head on [s_l, r_l].
        self.top_posterior = GaussianHead((hidden,), dims[-1], clamp)
        self.top_down = nn.ModuleList(ResidualBlock(hidden, 0.0) for _ in range(n_levels - 1))
        self.prior_heads = nn.ModuleList(GaussianHead((hidden,), d, clamp) for d in dims[:-1])
        self.posterior_heads = nn.ModuleList(GaussianHead((hidden, hidden), d, clamp, hidden=hidden) for d in dims[:-1])
        # z_l -> top-down state, for every level that has a level below it (index l - 1).
        self.latent_in = nn.ModuleList(nn.Linear(d, hidden) for d in dims[1:])

        self.decoder = Decoder(config)
        self.readout = Readout(config) if config.readout_weight > 0 else None
        # Levels with a coarse target of their own (the top first): counts pooled over gene modules.
        if config.module_levels and not config.gene_modules:
            raise ValueError(
                "HVAEConfig.module_levels asks for gene modules built from the data: "
                "config = hvae.fit_gene_modules(config, counts) first"
            )
        self.n_direct = len(config.direct_dims)
        self.module_heads = nn.ModuleList()
        for partition, dim in zip(config.gene_modules, reversed(dims)):
            self.module_heads.append(ModuleHead(partition, dim, hidden, config.n_batches))

        self.register_buffer("kl_level_weights", torch.tensor(config.kl_weights_per_level(), dtype=torch.float32))
        self.register_buffer("level_sizes", torch.tensor(dims, dtype=torch.float32))
        if any(c > 0 for c in config.kl_capacity):  # the ceilings and their Lagrange multipliers
            self.register_buffer("kl_capacity", torch.tensor(config.kl_capacity, dtype=torch.float32))
            self.register_buffer("capacity_multipliers", torch.zeros(n_levels))
        else:
            self.kl_capacity = self.capacity_multipliers = None
        # Running moments of log library size (count, sum, sum of squares), for `sample`.
        self.register_buffer("library_moments", torch.zeros(3, dtype=torch.float64))

    # ------------------------------------------------------------------ input checks
    def _check_inputs(
        self,
        counts: torch.Tensor,
        batch_index: torch.Tensor | None,
        check_values: bool | None = None,
        batches: bool = True,
    ) -> torch.Tensor | None:
        check_values = self.config.validate_inputs if check_values is None else check_values
        check_counts(self.config, counts, check_values)
        return check_batch_index(self.config, batch_index, counts.shape[0], check_values) if batches else None

    # ------------------------------------------------------------------ building blocks
    def _bottom_up(self, counts: torch.Tensor) -> list[torch.Tensor]:
        """Returns r_l for every level, each one block from the shared stem. One block, not a
        deep ladder: depth cost the top its active units."""
        r = self.stem(self._log_normalised(counts, counts.sum(dim=1)))
        return [block(r) for block in self.bottom_up]

    def _log_normalised(self, counts: torch.Tensor, library: torch.Tensor) -> torch.Tensor:
        """log1p of counts normalised to ``input_target_sum`` per cell: what the encoder reads
        and what the read-out predicts."""
        return torch.log1p(counts * (self.config.input_target_sum / library.clamp(min=1.0)).unsqueeze(1))

    def _thin(self, counts: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: in training each cell keeps a binomial share of its
        molecules, the share drawn per cell from U(1 - ``HVAEConfig.molecule_thinning``, 1);
        otherwise the counts."""
        thinning = self.config.molecule_thinning
        if not self.training or thinning == 0:
            return counts
        share = 1.0 - thinning * torch.rand(counts.shape[0], 1, device=counts.device)
        return torch.binomial(counts, share.expand_as(counts).contiguous())

    def _log_likelihood(self, counts: torch.Tensor, params) -> torch.Tensor:
        """(cells,) log-likelihood of the counts, summed over genes, in fp32."""
        mean, theta, zero_logits = params
        if zero_logits is None:
            return nb_log_prob(counts, mean, theta).sum(dim=-1)
        return zinb_log_prob(counts, mean, theta, zero_logits).sum(dim=-1)

    def walk(
        self,
        top: torch.Tensor,
        *,
        states: list[torch.Tensor] | None = None,
        sample: bool = False,
        given: list[torch.Tensor | None] | None = None,
        start: int | None = None,
        h: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Walk:
        """The top-down path from the top's value ``top`` to level 0 (or from below level ``start``,
        ``h`` the state after it: the coarse reconstruction restarts there).

        Each level takes ``given[level]`` where one is given; else a draw (``sample``) or the mean
        of its posterior given the bottom-up ``states`` (r_l), or of its prior without them. With
        ``states`` and ``sample`` (training) each level's KL(q || p) per unit is kept.
        """
        n_levels = self.config.n_levels
        values: list = [None] * n_levels
        logvars: list = [None] * n_levels
        kl: list = [None] * n_levels
        values[-1] = top
        if start is None:
            start = n_levels - 1
            h = self.latent_in[-1](top) if n_levels > 1 else None
        states_after = {start: h}
        for level in reversed(range(start)):
            s = self.top_down[level](h)
            mean, logvar = self.prior_heads[level](s)
            if level in self.config.unit_prior_levels:
                logvar = torch.zeros_like(logvar)
            if given is not None and given[level] is not None:
                z = given[level]
            else:
                if states is not None:  # the posterior: the prior moved by what the data say
                    prior_mean, prior_logvar = mean, logvar
                    delta_mean, delta_logvar = self.posterior_heads[level](s, states[level])
                    mean, logvar = prior_mean + delta_mean, prior_logvar + delta_logvar
                    if sample:
                        kl[level] = gaussian_kl(mean, logvar, prior_mean, prior_logvar, per_dimension=True)
                z = _draw(mean, logvar, generator) if sample else mean
            values[level], logvars[level] = z, logvar
            if level > 0:
                h = s + self.latent_in[level - 1](z)
                states_after[level] = h
        return Walk(values, logvars, kl, states_after)

    def direct_code(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The levels' values that the decoder and the read-out read, concatenated (level 0 first)."""
        return torch.cat(values[: self.n_direct], dim=-1)

    def _decode(self, values: list[torch.Tensor], library, batch_index, decoder=None):
        """Decoder output for every level's value (level 0 first)."""
        return (decoder or self.decoder)(self.direct_code(values), library, batch_index)

    def _module_reconstruction(
        self, counts: torch.Tensor, library: torch.Tensor, batch_index, samples: list
    ) -> torch.Tensor:
        """Mean NB NLL of the counts pooled over each coarse level's gene modules, decoded from that
        level's sample alone (summed over those levels)."""
        total = counts.new_zeros(())
        for head, sample in zip(self.module_heads, reversed(samples)):
            total = total + head(sample, counts, library, batch_index)
        return total

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        counts: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        kl_weight: float = 1.0,
        check_values: bool | None = None,
        coarse_level: int | None = None,
    ) -> HVAEOutput:
        """Loss terms for a minibatch.

        Args:
            counts: (cells, genes) raw counts (float or int tensor, dense).
            batch_index: (cells,) integer batch/donor index, required iff ``n_batches > 0``.
            kl_weight: KL warm-up weight in [0, 1] (see :func:`hvae.kl_warmup`). While it is
                below 1, KL balancing (if enabled) redistributes the KL penalty across levels.
            check_values: check that counts are non-negative integers and batch indices in
                range (default ``config.validate_inputs``). The check reads the result back to
                the host; a training loop that checks its batches on the CPU passes False.
            coarse_level: the truncation k of the coarse reconstruction this step (1..L-1);
                default a draw from torch's generator. A loop passes it to avoid the host read.
        """
        batch_index = self._check_inputs(counts, batch_index, check_values)
        counts = counts.float()
        states = self._bottom_up(self._thin(counts))
        library = counts.sum(dim=1)

        # Top-down pass with posterior samples; keep the state after each level for the coarse pass.
        mean_q, logvar_q = self.top_posterior(states[-1])
        path = self.walk(_draw(mean_q, logvar_q), states=states, sample=True)
        samples, h_after = path.values, path.states_after
        kl_levels = path.kl[:-1] + [gaussian_kl(mean_q, logvar_q, per_dimension=True)]  # (cells, dim) each

        decoded = self._decode(samples, library, batch_index)
        reconstruction = -self._log_likelihood(counts, decoded)
        kl = torch.stack([k.sum(dim=-1) for k in kl_levels], dim=1).mean(dim=0)  # (n_levels,), fp32

        coarse = self._coarse_reconstruction(counts, library, batch_index, h_after, samples, coarse_level)
        loss = reconstruction.mean() + self._weighted_kl(kl, kl_weight, kl_levels)
        loss = loss + self.config.coarse_reconstruction_weight * coarse
        modules = self._module_reconstruction(counts, library, batch_index, samples)
        loss, coarse = loss + modules, coarse + modules
        readout, readout_moments = self._readout(counts, library, batch_index, samples)
        loss = loss + self.config.readout_weight * readout
        return HVAEOutput(
            loss=loss,
            reconstruction=reconstruction,
            kl=kl,
            coarse_reconstruction=coarse,
            readout=readout,
            library=library,
            readout_moments=readout_moments,
        )

    def _readout(self, counts, library, batch_index, samples: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The read-out's loss on every molecule of the cells (not the encoder's thinned input),
        and the moments it saw."""
        if self.readout is None:
            return counts.new_zeros(()), None
        return self.readout(self.direct_code(samples), self._log_normalised(counts, library), batch_index)

    def _weighted_kl(self, kl: torch.Tensor, kl_weight: float, kl_levels: list[torch.Tensor]) -> torch.Tensor:
        """Free bits per unit and level weights, then KL balancing during warm-up, then the
        warm-up weight. ``kl`` is (n_levels,) mean KL per cell; ``kl_levels`` the (cells, dim)
        KL of each level."""
        floor = self.config.free_bits_per_dimension
        if floor > 0:  # each unit's first `floor` nats are free: a unit is not pruned below it
            kl_free = torch.stack([torch.clamp(k.mean(dim=0), min=floor).sum() for k in kl_levels])
        else:
            kl_free = kl
        kl_free = kl_free * self.kl_level_weights
        # The ceilings' Lagrangian term, at full weight from the first step (not warmed up): a capped
        # level is held to its nats while the others fill.
        ceiling = 0.0 if self.kl_capacity is None else (self.capacity_multipliers * kl).sum()
        if self.config.kl_balance and kl_weight < 1.0 and self.config.n_levels > 1:
            coefficients = balanced_kl_coefficients(kl.detach(), self.level_sizes)
            return kl_weight * (coefficients * kl_free).sum() + ceiling
        return kl_weight * kl_free.sum() + ceiling

    def _coarse_reconstruction(
        self, counts, library, batch_index, h_after: dict, samples: list, coarse_level: int | None = None
    ) -> torch.Tensor:
        """Mean NLL of x decoded from levels >= k, lower levels at their prior means.

        Training draws one k in 1..L-1 per step (an unbiased estimate of the mean over k at
        the cost of one extra decoder pass); evaluation averages over every k.
        """
        n_levels = self.config.n_levels
        if n_levels == 1 or self.config.coarse_reconstruction_weight == 0:
            return counts.new_zeros(())
        if self.training:
            truncations = [int(torch.randint(1, n_levels, ()).item()) if coarse_level is None else coarse_level]
        else:
            truncations = list(range(1, n_levels))
        decode = self.decoder
        if self.config.coarse_detach_decoder:
            # The decoder learns from the full reconstruction only; the coarse term shapes
            # what the upper levels and the prior path feed it.
            frozen = {name: p.detach() for name, p in self.decoder.named_parameters()}

            def decode(*args):
                return torch.func.functional_call(self.decoder, frozen, args)

        total = counts.new_zeros(())
        for k in truncations:
            lower = self.walk(samples[-1], start=k, h=h_after[k]).values  # levels below k at their prior means
            decoded = self._decode(lower[:k] + samples[k:], library, batch_index, decode)
            total = total - self._log_likelihood(counts, decoded).mean()
        return total / len(truncations)

    @torch.no_grad()
    def encode(self, counts: torch.Tensor, *, return_logvar: bool = False, check_values: bool | None = None):
        """What each level exports, level 0 first: a list of (cells, representation_dims[l]):
        what levels l..top predict of the cell's standardised log expression (``hvae.exports``).

        With ``return_logvar=True`` returns ``(means, logvars)`` laid out alike: the posterior's
        variance of each export coordinate, carried through the export to first order. The
        encoder does not read batches: no batch index is needed. ``check_values`` as in
        :meth:`forward`.
        """
        means, logvars = self.encode_latents(counts, return_logvar=True, check_values=check_values)
        return exports.level_exports(self, means, logvars if return_logvar else None)

    @property
    def export_kind(self) -> str:
        """What :meth:`encode` exports: ``"readout"`` (what levels l..top predict through the
        read-out) or ``"code"`` (posterior means of z_l..z_top; a model without the read-out)."""
        return "code" if self.readout is None else "readout"

    @torch.no_grad()
    def encode_latents(self, counts: torch.Tensor, *, return_logvar: bool = False, check_values: bool | None = None):
        """Posterior means of each z_l alone, level 0 first: a list of (cells, latent_dims[l]).

        Each level is computed with the levels above it at their posterior means, in eval mode
        (no dropout) whatever the module's mode. For diagnostics (active units, KL per level);
        a representation to use is what ``encode`` returns.
        """
        self._check_inputs(counts, None, check_values, batches=False)
        was_training = self.training
        self.eval()  # deterministic: no dropout, whatever mode the caller left the model in
        try:
            return self._encode(counts.float(), return_logvar)
        finally:
            self.train(was_training)

    def _encode(self, counts: torch.Tensor, return_logvar: bool):
        states = self._bottom_up(counts)
        top_mean, top_logvar = self.top_posterior(states[-1])
        path = self.walk(top_mean, states=states)  # every level at its posterior mean
        means = [m.float() for m in path.values]
        if return_logvar:
            return means, [v.float() for v in path.logvars[:-1] + [top_logvar]]
        return means

    @torch.no_grad()
    def sample(
        self,
        n: int,
        batch_index: torch.Tensor | None = None,
        library_size: torch.Tensor | float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` cells of counts from the generative model: (n, genes) float tensor.

        ``library_size`` defaults to draws from the log-normal fitted to the library sizes
        recorded in training (:meth:`record_statistics`). ``batch_index`` (n,) is required
        iff the model has batches.
        """
        device = self.decoder.log_theta.device
        if batch_index is not None:
            batch_index = batch_index.to(device)
        batch_index = check_batch_index(self.config, batch_index, n, self.config.validate_inputs)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, device=device)

        levels = self.walk(randn(n, self.config.latent_dims[-1]), sample=True, generator=generator).values
        if library_size is None:
            count, total, total_sq = self.library_moments.tolist()
            if count == 0:
                raise ValueError("no library sizes were recorded (record_statistics): pass library_size")
            loc = total / count
            scale = math.sqrt(max(total_sq / count - loc**2, 1e-8))
            library_size = torch.exp(loc + scale * randn(n))
        library = torch.as_tensor(library_size, dtype=torch.float32, device=device).expand(n)
        mean, theta, zero_logits = self._decode(levels, library, batch_index)
        rate = torch._standard_gamma(theta.expand_as(mean).contiguous()) * (mean / theta)
        counts = torch.poisson(rate, generator=generator)
        if zero_logits is not None:
            keep = torch.rand(counts.shape, generator=generator, device=device) >= torch.sigmoid(zero_logits)
            counts = counts * keep
        return counts

    @torch.no_grad()
    def record_statistics(self, out: HVAEOutput, weight: torch.Tensor | float = 1.0) -> None:
        """Add a training step's statistics to the running ones: its library sizes to the
        log-normal fit that ``sample`` draws from, and the read-out's gene moments to those that
        standardise its target outside training.

        Called by the training loop after each step, not inside ``forward``; ``weight`` (a 0-d
        tensor: 0 for a skipped step) keeps the update on the device, with no host branch.
        """
        log_library = torch.log(out.library.detach().double().clamp(min=1.0))
        moments = torch.stack([torch.ones_like(log_library).sum(), log_library.sum(), (log_library**2).sum()])
        self.library_moments += moments * weight
        if out.readout_moments is not None:
            self.readout.moments += out.readout_moments * weight
        if self.kl_capacity is not None:  # dual ascent on each capped level's KL ceiling
            capped = self.kl_capacity > 0
            step = self.config.capacity_rate * weight * (out.kl.detach().float() - self.kl_capacity)
            self.capacity_multipliers.copy_((self.capacity_multipliers + step).clamp(min=0.0) * capped)
