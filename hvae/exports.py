"""What each level exports: the representation a user reads for level l.

With the read-out (the default), level l exports what levels l..top say about the cell's
expression: z_l..z_top at their posterior means, the levels below at their prior means given them,
read through the read-out's map, in coordinates where the Euclidean distance of two cells is that
of their predicted standardised expression (every gene counting alike, as in PCA). Level 0 reads
the whole code, the top its coarse summary alone; every level is as wide as the code the decoder
reads. The posterior means themselves are whitened by the N(0, I) prior: a lineage split of many
genes and a subtype split of a few would end up at like distances (benchmarks/RESULTS.md, "Each
level exports what it predicts through the read-out").

Without the read-out (``readout_weight=0``, checkpoints of format 3 and earlier) level l exports
the posterior means of [z_l, ..., z_top] concatenated.
"""

from __future__ import annotations

import torch

# Tangent rows (units x cells) that the variances' vectorised Jacobian takes in one pass: on a CPU
# the passes stay in cache (16k rows ran 1.5-2x faster than 256k on 2 cores); a GPU takes more.
_LOGVAR_ROWS = {"cpu": 16_384, "other": 262_144}


def level_exports(model, means: list[torch.Tensor], logvars: list[torch.Tensor] | None):
    """Every level's export (level 0 first) from the posterior ``means`` of each z_l, and with
    ``logvars`` the exports' variances (``(exports, export_logvars)``)."""
    n_levels = model.config.n_levels
    if model.readout is None:
        codes = [torch.cat(means[level:], dim=-1) for level in range(n_levels)]
        if logvars is None:
            return codes
        return codes, [torch.cat(logvars[level:], dim=-1) for level in range(n_levels)]
    basis = readout_basis(model)
    exports = [level_export(model, level, means, basis) for level in range(n_levels)]
    if logvars is None:
        return exports
    return exports, [level_export_logvar(model, level, means, logvars, basis) for level in range(n_levels)]


def readout_basis(model) -> torch.Tensor:
    """(D, D) for a code of D units: ``S V^T`` of the read-out's map ``W = U S V^T`` (genes x D), so
    that ``|basis (a - b)| = |W (a - b)|`` for any two codes. An export's first coordinate is the
    direction that moves the predicted expression most. Computed once per set of weights."""
    weight = model.readout.head.weight
    key = (weight.data_ptr(), weight._version, weight.device)  # any in-place update bumps _version
    if getattr(model, "_basis_key", None) != key:
        _, singular, vh = torch.linalg.svd(weight.detach().cpu().double(), full_matrices=False)  # float64: not on MPS
        model._basis, model._basis_key = (singular[:, None] * vh).to(weight.device, torch.float32), key
    return model._basis


def level_export(model, level: int, values: list[torch.Tensor], basis: torch.Tensor) -> torch.Tensor:
    """Level ``level``'s export: ``values`` of levels >= ``level`` (level 0 first; the rest unused),
    the levels below at their prior means given them."""
    if level > 0:  # level 0 is given every level: no walk
        values = model.walk(values[-1], given=[v if below >= level else None for below, v in enumerate(values)]).values
    return model.direct_code(values).float() @ basis.T


def level_export_logvar(
    model, level: int, means: list[torch.Tensor], logvars: list[torch.Tensor], basis: torch.Tensor
) -> torch.Tensor:
    """log of sum_j (d export / d z_j)^2 var_j over the units j of levels >= ``level``: the
    posterior's variance carried through the export to first order (units independent).

    Level 0's export is linear in the code: closed form over the levels the decoder reads. Above
    it, the Jacobian's columns are forward-mode derivatives, one per unit, in one vectorised pass
    (``vmap`` over the units' tangents); at most ``_LOGVAR_ROWS`` tangent rows at once.
    """
    if level == 0:
        scales = torch.cat([torch.exp(0.5 * v) for v in logvars[: len(model.config.direct_dims)]], dim=-1)
        return torch.log(((scales**2) @ (basis**2).T).clamp(min=1e-30))
    scales = torch.cat([torch.exp(0.5 * v) for v in logvars[level:]], dim=-1)
    cells, units = scales.shape
    dims = [m.shape[1] for m in means[level:]]
    below = means[:level]

    def export(*upper: torch.Tensor) -> torch.Tensor:
        return level_export(model, level, below + list(upper), basis)

    def derivative(*tangents: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(export, tuple(means[level:]), tangents)[1]

    rows = _LOGVAR_ROWS["cpu" if scales.device.type == "cpu" else "other"]
    per_pass = max(1, rows // max(cells, 1))
    eye = torch.eye(units, device=scales.device, dtype=scales.dtype)
    variance = torch.zeros(cells, basis.shape[0], device=basis.device)
    for first in range(0, units, per_pass):
        chosen = eye[first : first + per_pass]  # (k, units): one tangent per unit
        tangents = (chosen[:, None, :] * scales[None]).split(dims, dim=-1)  # (k, cells, d_l) each
        changes = torch.func.vmap(derivative)(*tangents)  # (k, cells, D)
        variance = variance + (changes.float() ** 2).sum(dim=0)
    return torch.log(variance.clamp(min=1e-30))
