"""The metrics behind `evaluate`, on embeddings whose answer is known."""

import numpy as np
import pytest

from pipeline.evaluate.metrics import batch_mixing, cluster_agreement, knn_accuracy, scib_scores, silhouette_label


@pytest.fixture(scope="module")
def separated():
    """Four well separated label clusters; two batches mixed inside every cluster."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array(["a", "b", "c", "d"]), 300)
    batches = np.tile(np.array(["donor1", "donor2"]), 600)
    centres = rng.normal(scale=10.0, size=(4, 8))
    embedding = centres[np.repeat(np.arange(4), 300)] + rng.normal(size=(1200, 8))
    return embedding.astype(np.float32), labels, batches


def test_separated_labels_score_perfectly(separated):
    embedding, labels, _ = separated
    assert knn_accuracy(embedding, labels) == 1.0
    assert cluster_agreement(embedding, labels) == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    assert silhouette_label(embedding, labels) > 0.85


def test_random_labels_score_at_chance(separated):
    embedding, labels, _ = separated
    shuffled = np.random.default_rng(1).permutation(labels)
    assert knn_accuracy(embedding, shuffled) < 0.35
    assert cluster_agreement(embedding, shuffled)["ari"] < 0.02
    assert silhouette_label(embedding, shuffled) < 0.52


def test_batch_mixing_tells_mixed_from_separated_batches(separated):
    embedding, labels, batches = separated
    assert batch_mixing(embedding, batches) > 0.95
    by_label = np.where(np.isin(labels, ["a", "b"]), "donor1", "donor2")  # each donor its own clusters
    assert batch_mixing(embedding, by_label) < 0.05
    assert np.isnan(batch_mixing(embedding, np.full(len(labels), "one donor")))


def test_batch_mixing_within_labels_tells_composition_from_batch_signal(separated):
    """Donors that differ only in composition (donor1 has most of a and b) mix poorly overall but
    fully inside each label; donors that split every cluster in two mix poorly inside labels too."""
    embedding, labels, batches = separated
    rng = np.random.default_rng(1)
    mostly = np.where(np.isin(labels, ["a", "b"]), 0.9, 0.1)
    composition = np.where(rng.random(len(labels)) < mostly, "donor1", "donor2")
    assert batch_mixing(embedding, composition) < 0.75
    assert batch_mixing(embedding, composition, within=labels) > 0.95
    split = embedding.copy()
    split[batches == "donor1"] += 6.0  # every cluster in two, one half per donor
    assert batch_mixing(split, batches, within=labels) < 0.05
    with pytest.raises(ValueError, match="within 3"):
        batch_mixing(embedding, composition, within=labels[:3])


def test_missing_labels_are_left_out():
    embedding = np.repeat(np.eye(3, dtype=np.float32) * 10, 20, axis=0)
    labels = np.repeat(np.array(["x", "y", None], dtype=object), 20)
    assert knn_accuracy(embedding, labels) == 1.0
    assert cluster_agreement(embedding, labels)["ari"] == pytest.approx(1.0)


@pytest.mark.slow
def test_scib_metrics_suite(separated):
    pytest.importorskip("scib_metrics", reason="the `eval` extra is not installed")
    embedding, labels, batches = separated
    graphs = {}
    scores = scib_scores(embedding, labels, batches, graphs=graphs)
    assert scores["leiden_nmi"] > 0.95 and scores["leiden_ari"] > 0.95 and scores["graph_connectivity"] > 0.95
    assert scores["ilisi"] > 0.8 and scores["kbet"] > 0.7
    by_label = np.where(np.isin(labels, ["a", "b"]), "donor1", "donor2")
    assert scib_scores(embedding, labels, by_label, graphs=graphs)["ilisi"] < 0.1
    assert len(graphs) == 1  # the same labelled cells: one neighbour graph for both calls
    partly = labels.astype(object)
    partly[::7] = None  # unlabelled cells are left out, as in the other metrics
    assert scib_scores(embedding, partly, batches, graphs=graphs)["leiden_nmi"] > 0.95 and len(graphs) == 2


def test_level_table_has_a_donor_column_only_when_the_rows_have_one():
    from pipeline.demo import format_table

    row = {"representation": "HVAE level 0", "dim": 32, "kl": 1.2, "active_units": None, "subtype": 0.8}
    without = format_table([row], ["subtype"]).splitlines()
    assert without[0] == "| representation | dim | KL (nats) | active units | kNN subtype |"
    assert without[2] == "| HVAE level 0 | 32 | 1.2 | - | 0.8 |"
    with_mixing = format_table([{**row, "batch_mixing": 0.9}], ["subtype"]).splitlines()
    assert with_mixing[0].endswith("| kNN subtype | donor mixing |")
    assert with_mixing[2] == "| HVAE level 0 | 32 | 1.2 | - | 0.8 | 0.9 |"


def test_check_five_compares_donor_mixing_within_the_finest_labels():
    """Check 5 reads the mixing within labels where it is given (the global score is reported beside it)."""
    from pipeline.evaluate.hierarchy import hierarchy_checks

    def rep(mixing, within):
        return {"knn": {"coarse": 1.0, "fine": 0.9}, "silhouette": 0.6, "mixing": mixing, "mixing_within": within}

    levels, pca = [rep(0.90, 0.97), rep(0.93, 0.97)], rep(0.5, 0.6)
    fifth = hierarchy_checks(levels, rep(0.95, 0.96), pca, ["coarse", "fine"])[4]
    assert (
        fifth.number == 5
        and fifth.passed
        and "within fine" in fifth.name
        and "global: worst level 0 0.900" in fifth.detail
    )
    assert not hierarchy_checks(levels, rep(0.95, 0.98), pca, ["coarse", "fine"])[4].passed
    no_within = [{k: v for k, v in r.items() if k != "mixing_within"} for r in levels]
    flat = {k: v for k, v in rep(0.95, 0).items() if k != "mixing_within"}
    assert not hierarchy_checks(no_within, flat, pca, ["coarse", "fine"])[4].passed  # the global score alone


def test_checks_six_to_nine_fail_when_every_level_is_the_same_representation():
    """Checks 6-9 read what each level lets go: a flat hierarchy (three copies of one map) fails
    them all, and a coarse-to-fine one passes them."""
    from pipeline.evaluate.hierarchy import hierarchy_checks

    labels = ["lineage", "cell_type", "subtype"]

    def rep(knn, within_type, within_lineage, silhouette, kl):
        return {
            "knn": {"lineage": 1.0, "cell_type": knn, "subtype": knn},
            "silhouette": silhouette,
            "kl": kl,
            "knn_within": {"subtype": within_type, "cell_type": within_lineage},
        }

    pca = rep(0.9, 0.6, 0.8, 0.55, None)
    same = [rep(0.97, 0.95, 0.98, 0.60, kl) for kl in (2.3, 1.2, 18.9)]
    verdicts = {c.number: c.passed for c in hierarchy_checks(same, same[0], pca, labels)}
    assert verdicts[1] and verdicts[3]  # the old checks pass on three copies of one map ...
    assert not any(verdicts[n] for n in (6, 7, 8, 9)), verdicts  # ... the new ones do not
    graded = [rep(0.97, 0.95, 0.98, 0.60, 10.0), rep(0.90, 0.70, 0.97, 0.68, 4.0), rep(0.60, 0.40, 0.60, 0.75, 3.0)]
    checks = hierarchy_checks(graded, graded[0], pca, labels)
    assert all(c.passed for c in checks if c.number in (6, 7, 8, 9)), "\n".join(c.line() for c in checks)
    # Real data: smaller margins, and level 1 need only beat the top on one grain.
    real = [rep(0.90, 0.80, 0.90, 0.60, 10.0), rep(0.88, 0.78, 0.85, 0.64, 4.0), rep(0.85, 0.74, 0.80, 0.66, 3.0)]
    assert all(c.passed for c in hierarchy_checks(real, real[0], pca, labels, kind="real") if c.number in (6, 7, 8, 9))
    assert not any(c.passed for c in hierarchy_checks(real, real[0], pca, labels) if c.number in (6, 7))


def test_knn_within_scores_a_label_inside_each_parent():
    from pipeline.evaluate import knn_accuracy, knn_within

    rng = np.random.default_rng(0)
    parents = np.repeat(["a", "b"], 200)
    children = np.tile(np.repeat(["x", "y"], 100), 2)
    # The embedding separates the parents widely and the children inside them not at all ...
    blind = np.c_[np.where(parents == "a", 0.0, 50.0), np.zeros(400)] + rng.normal(size=(400, 2))
    # ... or by a small shift that a kNN fitted inside each parent finds.
    seeing = blind + np.c_[np.zeros(400), np.where(children == "x", 0.0, 6.0)]
    assert knn_within(blind, children, parents) < 0.65 and knn_within(seeing, children, parents) > 0.95
    labels = np.char.add(parents.astype(str), children.astype(str))
    assert knn_accuracy(seeing, labels) > 0.95
    # A parent with one child label has nothing to resolve and is left out.
    single = np.where(parents == "a", "x", children)
    assert knn_within(seeing, single, parents) == pytest.approx(knn_within(seeing[200:], children[200:], parents[200:]))


def test_majority_within_is_the_chance_level_check_six_names():
    """Children of skewed frequencies: naming each parent's commonest child is right 80% of the time,
    as often as a kNN on a map blind to them; check 6 says that no top can then pass it."""
    from pipeline.evaluate import knn_within, majority_within
    from pipeline.evaluate.hierarchy import hierarchy_checks

    rng = np.random.default_rng(0)
    parents = np.repeat(["a", "b"], 500)
    children = np.where(rng.random(1000) < 0.8, "x", "y")
    assert majority_within(children, parents) == pytest.approx(np.mean(children == "x"))
    blind = np.c_[np.where(parents == "a", 0.0, 50.0), np.zeros(1000)] + rng.normal(size=(1000, 2))
    assert abs(knn_within(blind, children, parents) - majority_within(children, parents)) < 0.03
    assert majority_within(np.where(parents == "a", "x", children), parents) == pytest.approx(
        majority_within(children[500:], parents[500:])
    )  # the same groups as knn_within
    level = {"knn": {"p": 1.0, "c": 0.8}, "knn_within": {"c": 0.79}, "silhouette": 0.5, "kl": 3.0}
    chance = {"c": majority_within(children, parents)}
    six = next(c for c in hierarchy_checks([level, level], level, level, ["p", "c"], chance=chance) if c.number == 6)
    assert not six.passed and "no better than chance, so no top can pass" in six.detail


def test_knn_across_donors_takes_away_what_a_map_reads_off_the_donor():
    """Donors of skewed composition (each mostly one subtype): a map that holds the donor and
    nothing of the subtypes reads them well by kNN within the donor's neighbours, and no better than
    a coin across donors; a map that holds the subtypes reads them across donors too."""
    from pipeline.evaluate import knn_accuracy, knn_across

    rng = np.random.default_rng(0)
    donors = np.repeat(np.arange(8), 100)
    subtypes = np.where(rng.random(800) < 0.85, donors % 2, 1 - donors % 2).astype(str)  # donor-skewed
    donor_map = np.c_[donors * 10.0, np.zeros(800)] + rng.normal(size=(800, 2))
    subtype_map = np.c_[np.zeros(800), (subtypes == "1") * 10.0] + rng.normal(size=(800, 2))
    assert knn_accuracy(donor_map, subtypes) > 0.8  # the donor's commonest subtype
    assert knn_across(donor_map, subtypes, donors) < 0.6  # other donors' cells tell no better than a coin
    assert knn_across(subtype_map, subtypes, donors) > 0.95
    parents = np.repeat(["p", "q"], 400)
    assert knn_across(subtype_map, subtypes, donors, parents) > 0.95
    assert np.isnan(knn_across(subtype_map, subtypes, np.zeros(800)))  # one donor: nothing across
