"""The hot path reads nothing back to the host: `train` under torch.profiler, on the CPU.

On a GPU every read of a device value (``.item()``, ``float(t)``, ``bool(t)``, a data-dependent
size) is a synchronisation that stalls the device and the loader behind it. Each of them goes
through ``aten::_local_scalar_dense`` on the CPU too, so the CPU profile counts them.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.config import load_config
from pipeline.data import ShardSettings, write_shards
from pipeline.data.sources import SyntheticSource
from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec
from pipeline.train import train

STEPS, LOG_EVERY = 30, 10


def _reads_outside_the_optimizer(events) -> tuple[int, list[str]]:
    """Host reads not inside ``Optimizer.step`` (whose step counters stay on the CPU) nor in the
    set-up that builds the gene modules once before the first step."""
    steps = [e for e in events if e.name.startswith("Optimizer.step") or e.name == "hvae.fit_gene_modules"]

    def in_optimizer(event) -> bool:
        return any(
            s.thread == event.thread and s.time_range.start <= event.time_range.start <= s.time_range.end for s in steps
        )

    reads = [e for e in events if e.name == "aten::_local_scalar_dense" and not in_optimizer(e)]
    stacks = sorted({" <- ".join(_parents(e)) for e in reads})
    return len(reads), stacks


def _parents(event, depth: int = 5) -> list[str]:
    names = []
    while event is not None and len(names) < depth:
        names.append(event.name)
        event = event.cpu_parent
    return names


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("hot") / "shards"
    atlas = SyntheticAtlas(SyntheticAtlasSpec(n_cells=2_000, n_genes=200, n_donors=4, seed=1))
    write_shards(SyntheticSource(atlas), str(out), ShardSettings(shard_size=1_000, progress=False))
    return str(out)


@pytest.mark.slow
def test_a_training_step_reads_at_most_one_value_back_to_the_host(shards, tmp_path):
    config = load_config(
        base={"data": {"path": shards, "batch_key": "donor_id"}},
        overrides=[
            f"train.max_steps={STEPS}",
            "train.batch_size=64",
            f"train.log_every={LOG_EVERY}",
            "train.progress=false",
            "model.hidden_dim=64",
            "model.latent_dims=[16,8,4]",
            f"checkpoint.every_steps={STEPS}",
            f"run.storage_path={tmp_path}",
            "run.name=profiled",
        ],
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        summary = train(config)
    assert summary["step"] == STEPS
    reads, stacks = _reads_outside_the_optimizer(prof.events())
    # Logging steps read their metrics once; the end of the run reads a few more (summary).
    assert reads <= STEPS, f"{reads} host reads in {STEPS} steps:\n" + "\n".join(stacks[:20])
    assert reads <= STEPS // LOG_EVERY + 10, f"{reads} host reads in {STEPS} steps:\n" + "\n".join(stacks[:20])


def test_the_profile_sees_a_host_read():
    """The counter itself: one `.item()` per step in a plain loop is counted."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            float(torch.ones(3).sum())
    assert _reads_outside_the_optimizer(prof.events())[0] == 5
