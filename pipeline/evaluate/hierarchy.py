"""Is the hierarchy useful? The checks of the model-quality contract, on one dataset.

A level is useful when, at its granularity, it is the best representation of the same cells,
and when it holds its granularity and not the finer ones. With labels ordered coarsest ->
finest, HVAE levels (level 0 first), the flat model of level 0's width and PCA on the same genes
(kNN accuracy with 15 neighbours, 5-fold; medians over seeds):

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

Checks 1-5 pass when every level is the same representation. Checks 6-9 do not: they read what
each level lets go, through kNN accuracy *within the parent label* (``knn_within``: a classifier
fitted inside each label of the next-coarser column, weighted by cells), which a level that
holds only coarse structure scores near chance:

6. the top lets the finest labels go: the top's finest-within-parent <= level 0's - ``margin``
   (0.25 on the synthetic atlases, 0.05 on real data)
7. three grains, not two (3 label levels and 3 model levels): level 1 holds something the top lets
   go and lets go something level 0 holds. Synthetic: level 1's finest-within-parent <= level 0's
   - 0.10, and level 1 >= the top + 0.05 on finest-within-parent or middle-within-coarsest; real
   data: level 1 > the top on one of the two
8. the top holds the coarsest labels more tightly: coarsest-label silhouette at the top >= level
   0's + 0.10 (synthetic) or + 0.05 (real), and >= PCA's
9. information is spread: no level below the top holds less than 10% of the total KL (nats)

``slack`` loosens every bound by that much (a test on one seed asserts the checks with some).
"""

from __future__ import annotations

from dataclasses import dataclass

# Margins of checks 6-8: a synthetic atlas's grains are cleanly separable, real labels less so.
MARGINS = {
    "synthetic": {"let_go": 0.25, "level1_below_0": 0.10, "level1_above_top": 0.05, "silhouette": 0.10},
    "real": {"let_go": 0.05, "level1_below_0": None, "level1_above_top": 0.0, "silhouette": 0.05},
}
MIN_KL_SHARE = 0.10


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.number}. {self.name}: {self.detail}"


def hierarchy_checks(
    levels: list[dict],
    flat: dict,
    pca: dict,
    labels: list[str],
    slack: float = 0.0,
    kind: str = "synthetic",
    chance: dict | None = None,
) -> list[Check]:
    """The checks. ``levels`` (level 0 first), ``flat`` and ``pca`` are dicts with ``knn``
    ({label: accuracy}), ``silhouette`` (on the coarsest labels) and optionally ``mixing``,
    ``knn_within`` ({label: accuracy within its parent, the previous label}) and, for the levels,
    ``kl`` (nats); ``labels`` run coarsest -> finest; ``kind`` ("synthetic" or "real") picks the
    margins of checks 6-8; ``chance`` ({label: ``majority_within``}), when given, is named in check
    6, which no top can pass where level 0 resolves the finest labels no better. A check that does
    not apply (no batches, no within-parent scores, two label levels for check 7) is left out."""
    coarse, fine = labels[0], labels[-1]
    top = len(levels) - 1
    knn = [level["knn"] for level in levels]
    checks = []

    others = {f"level {l}": knn[l][fine] for l in range(1, len(levels))} | {"flat": flat["knn"][fine]}
    best_other = max(others, key=others.get)
    ok = knn[0][fine] >= others[best_other] - 0.005 - slack and knn[0][fine] >= pca["knn"][fine] - 0.02 - slack
    checks.append(
        Check(
            1,
            f"level 0 is the best on {fine}",
            ok,
            f"level 0 {knn[0][fine]:.3f}; best other {best_other} {others[best_other]:.3f} (-0.005); "
            f"PCA {pca['knn'][fine]:.3f} (-0.02)",
        )
    )

    worst = min(range(len(levels)), key=lambda l: knn[l][coarse])
    ok = (
        knn[top][coarse] >= pca["knn"][coarse] - 0.01 - slack
        and knn[worst][coarse] >= 0.98 * pca["knn"][coarse] - slack
    )
    checks.append(
        Check(
            2,
            f"the top holds {coarse}, no level mixes it",
            ok,
            f"top {knn[top][coarse]:.3f}, worst level {worst} {knn[worst][coarse]:.3f}; "
            f"PCA {pca['knn'][coarse]:.3f} (top -0.01, every level x0.98)",
        )
    )

    order = " >= ".join(f"{knn[l][fine]:.3f}" for l in range(len(levels)))
    ok = all(knn[l][fine] >= knn[l + 1][fine] - 0.01 - slack for l in range(top))
    checks.append(Check(3, f"detail grows downward on {fine}", ok, f"level 0 -> top: {order} (-0.01 each)"))

    worst = min(range(len(levels)), key=lambda l: levels[l]["silhouette"])
    ok = levels[worst]["silhouette"] >= pca["silhouette"] - slack
    checks.append(
        Check(
            4,
            f"every level separates {coarse} as PCA does",
            ok,
            f"silhouette: worst level {worst} {levels[worst]['silhouette']:.3f}, PCA {pca['silhouette']:.3f}",
        )
    )

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

    if top == 0:
        return checks
    margins = MARGINS[kind]
    within = [level.get("knn_within") or {} for level in levels]
    if len(labels) >= 2 and all(fine in w for w in within):
        parent = labels[-2]
        ok = within[top][fine] <= within[0][fine] - margins["let_go"] + slack
        detail = (
            f"{fine} within {parent}: top {within[top][fine]:.3f}, level 0 {within[0][fine]:.3f} "
            f"(-{margins['let_go']:.2f})"
        )
        if chance and fine in chance:
            detail += f"; chance (the majority {fine} of each {parent}) {chance[fine]:.3f}"
            if within[0][fine] <= chance[fine] + 0.02:
                detail += f": level 0 resolves {fine} no better than chance, so no top can pass"
        checks.append(Check(6, f"the top lets {fine} within {parent} go", ok, detail))

    if len(labels) >= 3 and top >= 2 and all(fine in w and labels[1] in w for w in within):
        middle = labels[1]
        holds = max(within[1][fine] - within[top][fine], within[1][middle] - within[top][middle])
        ok = holds >= margins["level1_above_top"] - slack if margins["level1_above_top"] else holds > -slack
        detail = (
            f"level 1 over the top: {fine} within {labels[-2]} {within[1][fine] - within[top][fine]:+.3f}, "
            f"{middle} within {coarse} {within[1][middle] - within[top][middle]:+.3f} "
            f"(one >= {margins['level1_above_top']:+.2f})"
        )
        if margins["level1_below_0"] is not None:
            lets_go = within[1][fine] <= within[0][fine] - margins["level1_below_0"] + slack
            ok = ok and lets_go
            detail += (
                f"; level 1 {within[1][fine]:.3f} vs level 0 {within[0][fine]:.3f} on {fine} within "
                f"{labels[-2]} (-{margins['level1_below_0']:.2f})"
            )
        checks.append(Check(7, "three grains, not two", ok, detail))

    ok = (
        levels[top]["silhouette"] >= levels[0]["silhouette"] + margins["silhouette"] - slack
        and levels[top]["silhouette"] >= pca["silhouette"] - slack
    )
    checks.append(
        Check(
            8,
            f"the top holds {coarse} more tightly",
            ok,
            f"silhouette top {levels[top]['silhouette']:.3f}, level 0 {levels[0]['silhouette']:.3f} "
            f"(+{margins['silhouette']:.2f}), PCA {pca['silhouette']:.3f}",
        )
    )

    if all(level.get("kl") is not None for level in levels):
        total = sum(level["kl"] for level in levels)
        shares = [level["kl"] / total if total > 0 else 0.0 for level in levels]
        ok = all(share >= MIN_KL_SHARE - slack for share in shares[:top])
        checks.append(
            Check(
                9,
                "information is spread",
                ok,
                "KL share level 0 -> top: "
                + " / ".join(f"{s:.0%}" for s in shares)
                + f" of {total:.1f} nats (each below the top >= {MIN_KL_SHARE:.0%})",
            )
        )
    return checks


__all__ = ["Check", "MARGINS", "MIN_KL_SHARE", "hierarchy_checks"]
