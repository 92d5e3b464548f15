"""Fault injection for the tests: a process exits at a chosen point, as a killed job would.

Set through environment variables only, never through the user's config::

    HVAE_FAIL_AT_STEP=<step>[:<rank>]   a training worker (rank 0 by default) exits once at <step>
                                        (a marker file in the run directory keeps a restarted
                                        worker from failing again)
    HVAE_FAIL_AFTER_CHUNKS=<n>          embed, in one process, exits after writing <n> chunks
    HVAE_KILL_AT=<n>                    the process SIGKILLs itself at the <n>-th kill point it
                                        reaches (``point``: between the writes of shard, train,
                                        checkpoints, embed and the --overwrite swap), as kill -9 would
    HVAE_KILL_SHARD_PART=<p>            shard --workers: the Ray task of pass-1 part <p> SIGKILLs itself
                                        once, mid-way (a marker in the staging directory, or in
                                        HVAE_KILL_MARKERS=<dir>, keeps its retry alive)
    HVAE_KILL_POINTS=<file>             append the name of every kill point reached to <file>
                                        (how a test counts a run's points before choosing some)

Ray Train workers do not always inherit the driver's environment, so the driver forwards these
variables in the worker's loop config (``forwarded`` / ``install``).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

_lock = threading.Lock()

EXIT_CODE = 17
_NAMES = (
    "HVAE_FAIL_AT_STEP",
    "HVAE_FAIL_AFTER_CHUNKS",
    "HVAE_KILL_AT",
    "HVAE_KILL_POINTS",
    "HVAE_KILL_SHARD_PART",
    "HVAE_KILL_MARKERS",
)
_reached = 0


def forwarded() -> dict[str, str]:
    """The fault variables set in this process, to hand to worker processes."""
    return {name: os.environ[name] for name in _NAMES if name in os.environ}


def install(variables: dict[str, str]) -> None:
    os.environ.update(variables)


def maybe_fail_training(run_dir: str, rank: int, step: int) -> None:
    value = os.environ.get("HVAE_FAIL_AT_STEP")
    if not value:
        return
    at, _, on_rank = value.partition(":")
    if step != int(at) or rank != int(on_rank or 0):
        return
    marker = Path(run_dir) / f".failed_at_{step}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os._exit(EXIT_CODE)


def maybe_kill_shard_part(staging: str, part: int) -> None:
    """Arm a SIGKILL of this pass-1 task after it has spilled some rows (tests only)."""
    value = os.environ.get("HVAE_KILL_SHARD_PART")
    if not value or int(value) != part:
        return
    marker = Path(os.environ.get("HVAE_KILL_MARKERS") or staging) / f".killed_part_{part}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    global _reached
    _reached = 0  # a reused worker process has counted other tasks' points
    os.environ["HVAE_KILL_AT"] = "2"  # the second spill of this task: some rows already written


def maybe_fail_embedding(chunks_written: int) -> None:
    value = os.environ.get("HVAE_FAIL_AFTER_CHUNKS")
    if value and chunks_written == int(value):
        os._exit(EXIT_CODE)


def point(name: str) -> None:
    """A kill point: a place between two writes where a killed job would leave its output."""
    kill_at, log = os.environ.get("HVAE_KILL_AT"), os.environ.get("HVAE_KILL_POINTS")
    if not kill_at and not log:
        return
    global _reached
    with _lock:  # points are reached from writer threads too
        _reached += 1
        if log:
            with open(log, "a") as handle:
                handle.write(f"{_reached} {name}\n")
        if kill_at and _reached == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
