"""A month of releases: the scheduled command (`hvae-pipeline embed-release`) embeds one release a
day for --releases days into object storage (a real S3 server, moto, on loopback; --out-root
names a bucket or folder of your own instead), with jobs SIGKILLed at random (at a kill point, or
on a timer anywhere) and retried, and overlapping starts (two jobs for one release started
together, as a cron firing while the last night's job still runs).

At the end every release must be complete exactly once: its store equal to an uninterrupted run
of the same release, published once (one version, no unpublished one), its index that of the
store, one complete record of it in the runs file (index.json), and no lease, staging or probe
object left. The table prints the runs, kills, overlaps and losses (the goal: 0).

    python benchmarks/release_month.py                      # 30 releases, 8 kills, 2 overlaps
    python benchmarks/release_month.py --releases 3 --kills 1 --overlaps 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CLI = [sys.executable, "-m", "pipeline"]


def run(*args, env=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:2]))} failed:\n{result.stdout[-1500:]}{result.stderr[-3000:]}")
    return result


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def moto_bucket() -> tuple[str, object]:
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS variables point every client
    (this process and the jobs it starts) at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket="release-month")
    return "s3://release-month/embeddings", server


def prepare(work: Path) -> tuple[str, str]:
    """(the Census-shaped release, a small model trained on the same cells)."""
    with tarfile.open(SHARED / "census_shaped_pbmc3k_soma.tar.gz") as tar:
        tar.extractall(work / "census", filter="data")
    run("shard", SHARED / "pbmc3k_raw_seurat_annotations.h5ad", "--out", work / "shards", "--n-top-genes", "500")
    run(
        "train",
        f"data.path={work / 'shards'}",
        "train.max_steps=30",
        "train.batch_size=128",
        "train.progress=false",
        f"run.storage_path={work}",
        "run.name=model",
    )
    return str(work / "census" / "soma"), str(work / "model")


def store_of(out_root: str, release: str) -> str:
    from pipeline import storage

    return storage.join(out_root, release, "embeddings.zarr")


def content(out_root: str, release: str) -> tuple:
    from pipeline.embed import read_embeddings

    adata = read_embeddings(store_of(out_root, release), lazy=False)
    return list(adata.obs_names), [np.asarray(adata.obsm[f"X_hvae_level_{l}"]) for l in range(3)]


def check_release(out_root: str, release: str, reference: tuple, runs: list[dict]) -> list[str]:
    """What is wrong with one release at the end (empty: complete exactly once)."""
    from pipeline import storage
    from pipeline.query.index import check_index, read_manifest

    problems = []
    store = store_of(out_root, release)
    try:
        ids, levels = content(out_root, release)
        if ids != reference[0]:
            problems.append("other cells than the uninterrupted run")
        elif not all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(levels, reference[1])):
            problems.append("other values than the uninterrupted run")
    except Exception as error:  # noqa: BLE001 - any failure to read is a loss
        problems.append(f"store unreadable: {type(error).__name__}: {error}")
    if storage.is_remote(store):  # object storage: published once, no unpublished version
        versions = storage.listdir(storage.join(store, storage.VERSIONS))
        if storage.listdir(store) != [storage.POINTER, storage.VERSIONS] or len(versions) != 1:
            problems.append(f"not published once: {storage.listdir(store)}, versions {versions}")
    try:
        check_index(read_manifest(store + ".index"))
    except Exception as error:  # noqa: BLE001
        problems.append(f"index: {type(error).__name__}: {error}")
    complete = [r for r in runs if r["release"] == release and r["status"] == "complete"]
    if len(complete) != 1:
        problems.append(f"{len(complete)} complete records in index.json")
    return problems


def leftovers(out_root: str) -> list[str]:
    """Objects no finished job should leave: leases, staging, probes, temporary files."""
    from pipeline import storage

    fs, inner = storage.filesystem(out_root)
    fs.invalidate_cache()
    marks = (".lease.", ".overwrite-partial", ".hvae-write-test", ".tmp", ".partial", ".replaced")
    return [path for path in fs.find(inner) if any(mark in path for mark in marks)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", type=int, default=30)
    parser.add_argument("--kills", type=int, default=8, help="releases whose first job is SIGKILLed, then retried")
    parser.add_argument("--overlaps", type=int, default=2, help="releases started twice at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-root", help="a bucket prefix or folder of your own (default: moto S3 on loopback)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.kills + args.overlaps > args.releases:
        parser.error("--kills + --overlaps must not exceed --releases (one event per release)")
    os.environ.update({"TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    rng = np.random.default_rng(args.seed)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="release-month-") as tmp:
        work = Path(tmp)
        census, model = prepare(work)
        server = None
        out_root = args.out_root
        if out_root is None:
            out_root, server = moto_bucket()
        try:
            figures = month(out_root, census, model, work, args, rng)
        finally:
            if server is not None:
                server.stop()
    figures["seconds"] = round(time.perf_counter() - began, 1)
    figures["pass"] = (
        figures["releases_lost_or_wrong"] == 0
        and figures["objects_left_in_staging"] == 0
        and figures["unexpected_exits"] == 0
        and figures["records_in_index"] == figures["releases"]
    )
    print_table(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


def month(out_root: str, census: str, model: str, work: Path, args, rng) -> dict:
    from pipeline.embed.release import read_index

    def job(release: str, root: str = out_root) -> list[str]:
        return [
            *("embed-release", "--checkpoint", model, "--out-root", root, "--census-uri", census),
            *("--release", release, "--chunk-rows", "500"),  # 6 chunks a release: kill points between them
        ]

    # The uninterrupted run: what every release must end equal to, and where the kill points are.
    reference_root = out_root.rstrip("/") + "-reference"  # beside it: not counted in its runs file
    log = work / "points.log"
    timed = time.perf_counter()
    run(*job("reference", reference_root), env={"HVAE_KILL_POINTS": str(log)})
    seconds_per_job = time.perf_counter() - timed
    points = [line.split() for line in log.read_text().splitlines()]
    reference = content(reference_root, "reference")

    releases = [f"2026-12-{day + 1:02d}" for day in range(args.releases)]
    events = rng.permutation(args.releases)
    killed_days = set(events[: args.kills].tolist())
    overlap_days = set(events[args.kills : args.kills + args.overlaps].tolist())
    log_rows, counts = [], {"jobs": 0, "killed_at_point": 0, "killed_on_timer": 0, "timer_missed": 0}
    counts.update({"overlapping_starts": 0, "refused_as_held": 0, "unexpected_exits": 0})
    for day, release in enumerate(releases):
        if day in killed_days:
            if counts["killed_at_point"] <= counts["killed_on_timer"]:
                at, name = points[int(rng.integers(len(points)))]
                result = run(*job(release), env={"HVAE_KILL_AT": at}, check=False)
                counts["jobs"] += 1
                if result.returncode == -signal.SIGKILL:
                    counts["killed_at_point"] += 1
                    log_rows.append((release, f"killed at point {at} ({name})"))
                else:
                    counts["unexpected_exits"] += 1
                    log_rows.append((release, f"not killed at {at}: exit {result.returncode}"))
            else:
                delay = float(rng.uniform(0.4, 1.0) * seconds_per_job)  # past the imports, mostly
                process = start(*job(release))
                counts["jobs"] += 1
                time.sleep(delay)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.communicate()
                    counts["killed_on_timer"] += 1
                    log_rows.append((release, f"killed after {delay:.1f} s"))
                else:
                    process.communicate()
                    counts["timer_missed"] += 1
                    log_rows.append((release, f"finished before its kill at {delay:.1f} s"))
            result = run(*job(release), check=False)  # the retry (or the next night's run)
            counts["jobs"] += 1
            if result.returncode != 0:
                counts["unexpected_exits"] += 1
                log_rows.append((release, f"retry exit {result.returncode}: {result.stderr[-300:]}"))
        elif day in overlap_days:
            first, second = start(*job(release)), start(*job(release))
            counts["jobs"] += 2
            counts["overlapping_starts"] += 1
            outcomes, outputs = [], []
            for process in (first, second):
                out, err = process.communicate()
                outcomes.append((process.returncode, err))
                outputs.append((out, err))
            codes = sorted(code for code, _ in outcomes)
            held = [err for code, err in outcomes if code == 2 and "held by" in err]
            if codes == [0, 2] and held:
                counts["refused_as_held"] += 1
                log_rows.append((release, "two jobs at once: one embedded, one refused naming the holder"))
            elif codes == [0, 0] and any("nothing to do" in out for out, _ in outputs):
                log_rows.append((release, "two jobs at once: the second started after the first had finished"))
            else:
                counts["unexpected_exits"] += 1
                log_rows.append((release, f"two jobs at once: exits {codes}: {[e[-200:] for _, e in outcomes]}"))
        else:
            result = run(*job(release), check=False)
            counts["jobs"] += 1
            if result.returncode != 0:
                counts["unexpected_exits"] += 1
                log_rows.append((release, f"exit {result.returncode}: {result.stderr[-300:]}"))
    runs = read_index(out_root)
    problems = {release: check_release(out_root, release, reference, runs) for release in releases}
    lost = {release: p for release, p in problems.items() if p}
    left = leftovers(out_root)
    return {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "out_root": out_root,
        "releases": args.releases,
        **counts,
        "records_in_index": len(runs),
        "releases_lost_or_wrong": len(lost),
        "objects_left_in_staging": len(left),
        "seconds_per_uninterrupted_job": round(seconds_per_job, 1),
        "kill_points_per_job": len(points),
        "problems": lost,
        "left": left[:20],
        "log": log_rows,
    }


def print_table(figures: dict) -> None:
    for release, event in figures["log"]:
        print(f"  {release}: {event}")
    rows = [
        ("releases", figures["releases"]),
        ("jobs started", figures["jobs"]),
        ("killed at a kill point", figures["killed_at_point"]),
        ("killed on a timer", figures["killed_on_timer"]),
        ("timer kills that came too late", figures["timer_missed"]),
        ("overlapping starts (one refused)", f"{figures['overlapping_starts']} ({figures['refused_as_held']})"),
        ("unexpected exits", figures["unexpected_exits"]),
        ("records in index.json", figures["records_in_index"]),
        ("releases lost or wrong", figures["releases_lost_or_wrong"]),
        ("objects left in staging", figures["objects_left_in_staging"]),
        ("seconds", figures["seconds"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'a month of releases':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for release, problem in figures["problems"].items():
        print(f"LOST {release}: {problem}")
    verdict = "PASS" if figures["pass"] else "FAIL"
    print(f"\nverdict: {verdict} (every release complete exactly once, nothing left)")


if __name__ == "__main__":
    sys.exit(0 if main()["pass"] else 1)
