"""One writer per output: the lease beside an output, on the local disk and on S3 (moto on
loopback, conditional PUT), a second writer refused with the holder named or waiting, a stale
lease taken over, and two `embed` processes started together on one store."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.lease import Lease, LeaseHeld, LeaseLost


def output_of(where, tmp_path, request) -> str:
    if where == "local":
        return str(tmp_path / "store.zarr")
    return f"{request.getfixturevalue('s3')}/t{time.time_ns()}/store.zarr"


def as_another_process(lease: Lease) -> Lease:
    """Forget that this process holds ``lease`` (a nested lease would be a no-op), so that the
    next one stands for another process's writer."""
    from pipeline import lease as module

    module._held.pop(lease.output, None)
    return lease


@pytest.fixture(scope="module")
def s3():
    from test_object_storage import s3 as fixture

    yield from fixture.__wrapped__()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_is_refused_naming_the_holder_and_waits_with_wait(tmp_path, where, request):
    output = output_of(where, tmp_path, request)
    with Lease(output, "embedding", heartbeat=0.2) as first:
        with Lease(output, "embedding"):  # the same process again (embed-release around embed): nested, no-op
            pass
        as_another_process(first)
        with pytest.raises(LeaseHeld, match=r"embedding of .*store.zarr is held by .*pid %d" % os.getpid()):
            Lease(output, "embedding").acquire()
        released = threading.Event()
        got = []

        def second():
            with Lease(output, "embedding", wait=True, poll=0.1, echo=got.append):
                got.append("acquired")
                released.wait(5)

        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.5)
        assert got and "waiting" in got[0] and "acquired" not in got
    waiter.join(0.1)
    deadline = time.time() + 5
    while "acquired" not in got and time.time() < deadline:
        time.sleep(0.05)
    assert "acquired" in got  # released by the first, then taken by the waiter
    released.set()
    waiter.join(5)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stale_lease_is_taken_over_and_its_old_holder_stops(tmp_path, where, request):
    output = output_of(where, tmp_path, request)
    old = as_another_process(Lease(output, "sharding", heartbeat=60, stale_after=0.5).acquire())  # its heartbeat stalls
    time.sleep(0.8)
    said = []
    new = Lease(output, "sharding", heartbeat=0.1, stale_after=0.5, echo=said.append).acquire()
    assert said and "taking over" in said[0] and "no heartbeat" in said[0]
    old.check()  # not yet noticed
    assert old.beat() is False  # its next heartbeat sees the higher generation ...
    with pytest.raises(LeaseLost, match="taken over"):
        old.check()  # ... and its next write stops
    old.release()  # does not delete the new holder's lease
    as_another_process(new)
    with pytest.raises(LeaseHeld):
        Lease(output, "sharding").acquire()
    new.release()
    again = Lease(output, "sharding").acquire()  # released: free to take
    assert again.generation == 1  # every older generation was deleted
    again.release()


@pytest.mark.slow
def test_two_embed_runs_on_one_store_one_writes_the_other_is_refused(tmp_path):
    """Two `embed` processes started together on the same --out: exactly one embeds (the other
    exits 2 naming the holder), the store is complete once; with --wait the second finds it done."""
    from pipeline import HVAEModel
    from pipeline.data.synthetic import SyntheticAtlas, SyntheticAtlasSpec

    adata = SyntheticAtlas(SyntheticAtlasSpec(n_cells=3_000, n_genes=200, n_donors=2, seed=2)).to_anndata()
    adata.write_h5ad(tmp_path / "cells.h5ad")
    model = HVAEModel(adata, latent_dims=(4, 2), hidden_dim=16)
    model.train(max_steps=5, batch_size=64, progress=False)
    model.save(tmp_path / "model")
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "embed",
        "--checkpoint",
        str(tmp_path / "model"),
        "--source",
        str(tmp_path / "cells.h5ad"),
        "--out",
        str(tmp_path / "store.zarr"),
        "--chunk-rows",
        "200",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    runs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [(r.wait(300), *r.communicate()) for r in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "is held by" in refused and "--wait" in refused
    import zarr

    group = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    assert group.attrs["complete"] and group["progress/done"][:].all()
    waited = subprocess.run([*args, "--wait"], capture_output=True, text=True, env=env)
    assert waited.returncode == 0 and "already complete" in waited.stdout
    assert not [p for p in os.listdir(tmp_path) if ".lease." in p]  # every lease released


def test_the_lease_of_a_killed_job_on_this_host_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "shards")
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); from pipeline.lease import Lease;"
        "Lease(sys.argv[2], 'sharding').acquire(); os._exit(17)"
    )
    from pathlib import Path

    killed = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), output])
    assert killed.returncode == 17 and [p for p in os.listdir(tmp_path) if ".lease." in p]
    said = []
    with Lease(output, "sharding", echo=said.append):
        assert said and "is gone (killed)" in said[0]


@pytest.mark.slow
def test_a_training_run_holds_its_run_directory(tmp_path):
    """`train` takes the run directory's lease first: a second run on it is refused before it writes
    anything; a Ray worker's check (check_generation) stops on a lease that moved on."""
    from pipeline.lease import check_generation

    env = {**os.environ, "TQDM_DISABLE": "1"}
    shards, run = tmp_path / "shards", tmp_path / "runs" / "hvae"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "simulate",
            str(shards),
            "--format",
            "shards",
            "--n-cells",
            "600",
            "--n-genes",
            "50",
            "--shard-size",
            "300",
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        f"data.path={shards}",
        "train.max_steps=2",
        "train.batch_size=64",
        "train.progress=false",
        f"run.storage_path={tmp_path / 'runs'}",
        "model.latent_dims=[4,2]",
        "model.hidden_dim=16",
    ]
    holder = as_another_process(Lease(str(run), "training").acquire())
    refused = subprocess.run(args, capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and f"training of {run} is held by" in refused.stderr, refused.stderr[-2000:]
    assert not run.exists() or not any(run.iterdir())  # nothing written under a lease it does not hold
    holder.release()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "trained to step 2" in done.stdout, done.stderr[-2000:]
    assert not [p for p in os.listdir(tmp_path / "runs") if ".lease." in p]

    lease = as_another_process(Lease(str(run), "training").acquire())
    check_generation(str(run), lease.generation)  # still the holder's: no error
    Path(f"{run}.lease.{lease.generation + 1:06d}").write_text("{}")  # taken over
    with pytest.raises(LeaseLost, match="taken over by another writer"):
        check_generation(str(run), lease.generation)
    lease.release()


@pytest.mark.slow
def test_fifty_concurrent_runs_file_updates_lose_none(tmp_path):
    """Ten processes (and threads within each) record five runs each into one out-root's runs file
    at once: all fifty records are there; the runs file's lease is released."""
    code = (
        "import sys, threading; sys.path.insert(0, sys.argv[1]); from pipeline.embed.release import _record\n"
        "def one(i):\n"
        "    _record(sys.argv[2], {'release': f'r{sys.argv[3]}-{i}', 'model_id': 'm', 'status': 'complete',"
        " 'started': '2026-12-07T00:00:00'})\n"
        "threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    runs = [subprocess.Popen([sys.executable, "-c", code, root, str(tmp_path), str(p)]) for p in range(10)]
    assert [r.wait(300) for r in runs] == [0] * 10
    from pipeline.embed.release import read_index

    assert sorted(r["release"] for r in read_index(str(tmp_path))) == sorted(
        f"r{p}-{i}" for p in range(10) for i in range(5)
    )
    assert not [p for p in os.listdir(tmp_path) if ".lease." in p]
