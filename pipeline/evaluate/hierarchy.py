"""Is the hierarchy useful? The five checks of the model-quality contract, on one dataset.

A level is useful when, at its granularity, it is the best representation of the same cells.
With labels ordered coarsest -> finest, HVAE levels (level 0 first), the flat model of level 0's
width and PCA on the same genes (kNN accuracy with 15 neighbours, 5-fold; medians over seeds):

1. finest labels: level 0 >= max(every other level, the flat model) - 0.005, and >= PCA - 0.02
2. coarsest labels: the top >= PCA - 0.01, and every level >= 0.98 x PCA (no level mixes lineages)
3. detail grows downward: on the finest labels, level l >= level l+1 - 0.01 for every l
4. every level separates the coarsest labels as PCA does: label silhouette >= PCA's
5. with batches (donors): every level mixes them at least as well as the flat model, inside
   the finest labels (``batch_mixing(..., within=finest)``, key ``mixing_within``; the global
   score, key ``mixing``, where that is all there is). Donors differ in composition (in the
   synthetic atlases as in real cohorts), so a representation that resolves the finest types
   better has purer neighbourhoods and a lower *global* score with no more donor signal in it;
   the score within labels is what is left of the donor beyond the biology.

``slack`` loosens every bound by that much (a test on one seed asserts the checks with some).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.number}. {self.name}: {self.detail}"


def hierarchy_checks(levels: list[dict], flat: dict, pca: dict, labels: list[str], slack: float = 0.0) -> list[Check]:
    """The five checks. ``levels`` (level 0 first), ``flat`` and ``pca`` are dicts with ``knn``
    ({label: accuracy}), ``silhouette`` (on the coarsest labels) and optionally ``mixing``;
    ``labels`` run coarsest -> finest. A check that does not apply (no batches) is left out."""
    coarse, fine = labels[0], labels[-1]
    top = len(levels) - 1
    knn = [level["knn"] for level in levels]
    checks = []

    others = {f"level {l}": knn[l][fine] for l in range(1, len(levels))} | {"flat": flat["knn"][fine]}
    best_other = max(others, key=others.get)
    ok = knn[0][fine] >= others[best_other] - 0.005 - slack and knn[0][fine] >= pca["knn"][fine] - 0.02 - slack
    checks.append(Check(1, f"level 0 is the best on {fine}", ok,
                        f"level 0 {knn[0][fine]:.3f}; best other {best_other} {others[best_other]:.3f} (-0.005); "
                        f"PCA {pca['knn'][fine]:.3f} (-0.02)"))

    worst = min(range(len(levels)), key=lambda l: knn[l][coarse])
    ok = knn[top][coarse] >= pca["knn"][coarse] - 0.01 - slack and knn[worst][coarse] >= 0.98 * pca["knn"][coarse] - slack
    checks.append(Check(2, f"the top holds {coarse}, no level mixes it", ok,
                        f"top {knn[top][coarse]:.3f}, worst level {worst} {knn[worst][coarse]:.3f}; "
                        f"PCA {pca['knn'][coarse]:.3f} (top -0.01, every level x0.98)"))

    order = " >= ".join(f"{knn[l][fine]:.3f}" for l in range(len(levels)))
    ok = all(knn[l][fine] >= knn[l + 1][fine] - 0.01 - slack for l in range(top))
    checks.append(Check(3, f"detail grows downward on {fine}", ok, f"level 0 -> top: {order} (-0.01 each)"))

    worst = min(range(len(levels)), key=lambda l: levels[l]["silhouette"])
    ok = levels[worst]["silhouette"] >= pca["silhouette"] - slack
    checks.append(Check(4, f"every level separates {coarse} as PCA does", ok,
                        f"silhouette: worst level {worst} {levels[worst]['silhouette']:.3f}, PCA {pca['silhouette']:.3f}"))

    key = "mixing_within" if flat.get("mixing_within") is not None else "mixing"
    if flat.get(key) is not None and all(level.get(key) is not None for level in levels):
        worst = min(range(len(levels)), key=lambda l: levels[l][key])
        ok = levels[worst][key] >= flat[key] - slack
        detail = f"worst level {worst} {levels[worst][key]:.3f}, flat {flat[key]:.3f}"
        if key == "mixing_within" and flat.get("mixing") is not None:
            globally = min(range(len(levels)), key=lambda l: levels[l]["mixing"])
            detail += f" (global: worst level {globally} {levels[globally]['mixing']:.3f}, flat {flat['mixing']:.3f})"
        where = f" within {fine}" if key == "mixing_within" else ""
        checks.append(Check(5, f"donors mix{where} at least as in the flat model", ok, detail))
    return checks


__all__ = ["Check", "hierarchy_checks"]
