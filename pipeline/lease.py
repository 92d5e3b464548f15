"""One writer per output: a lease beside the output, taken before any write.

A lease is a small JSON object ``<output>.lease.<generation>`` (owner, host, pid, what, start and
heartbeat times) made with a create-if-absent write: a local exclusive create, on S3 a conditional
PUT (``If-None-Match: *``). The live lease is the highest generation present. A second writer
finds it held and is refused with the holder named, or with ``wait`` polls until it is released.
A holder rewrites its heartbeat every ``heartbeat`` seconds from a thread; a lease whose heartbeat
is older than ``stale_after`` is taken over by creating the next generation (of several takers,
the one create that succeeds wins), saying so, and the old holder, should it still run, sees a
higher generation at its next heartbeat and stops at its next check (``Lease.check``) instead of
writing on. A holder on this host whose process is gone (a killed job) is taken over at once. Readers never need a lease. Releasing deletes the holder's object.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from . import storage

STALE_AFTER = 120.0  # seconds without a heartbeat before a lease may be taken over
HEARTBEAT = 30.0


_held: dict[str, "Lease"] = {}  # outputs this process holds: a nested lease on one of them is a no-op
_held_lock = threading.Lock()


class LeaseHeld(FileExistsError):
    """Another writer holds the output's lease."""


class LeaseLost(RuntimeError):
    """This writer's lease was taken over (its heartbeat stalled past the timeout)."""


def _now() -> float:
    return time.time()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Lease:
    """``with Lease(output, "embedding"):`` holds ``output`` for this process."""

    def __init__(
        self,
        output: str,
        what: str,
        *,
        wait: bool = False,
        stale_after: float = STALE_AFTER,
        heartbeat: float = HEARTBEAT,
        poll: float = 5.0,
        echo=print,
    ) -> None:
        output = str(output).rstrip("/")
        self.output = output if storage.is_url(output) else os.path.abspath(output)
        self.what, self.wait, self.stale_after, self.heartbeat, self.poll, self.echo = (
            what,
            wait,
            stale_after,
            heartbeat,
            poll,
            echo,
        )
        self.generation: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record = {
            "what": what,
            "owner": getpass.getuser(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "started": _now(),
            "heartbeat": _now(),
        }

    # ------------------------------------------------------------------ paths and reads
    def _base(self) -> tuple:
        fs, inner = storage.filesystem(self.output)
        return fs, inner.rstrip("/")

    def _path(self, generation: int) -> str:
        return f"{self._base()[1]}.lease.{generation:06d}"

    def _generations(self) -> list[int]:
        fs, inner = self._base()
        parent, name = inner.rsplit("/", 1) if "/" in inner else ("", inner)
        try:
            entries = fs.ls(parent or ".", detail=False, refresh=True)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            prefix = name + ".lease."
            if base.startswith(prefix) and base[len(prefix) :].isdigit():
                found.append(int(base[len(prefix) :]))
        return sorted(found)

    def _read(self, generation: int) -> dict | None:
        fs, _ = self._base()
        try:  # one GET (an open file would hold the ETag that the next heartbeat replaces)
            return json.loads(fs.cat_file(self._path(generation)).decode())
        except (OSError, json.JSONDecodeError):
            return None

    def _create(self, generation: int) -> bool:
        """Create the generation's object if absent; False when another writer made it first."""
        fs, _ = self._base()
        data = json.dumps(self.record).encode()
        path = self._path(generation)
        if not storage.is_remote(self.output):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            return True
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> "Lease":
        try:
            return self._acquire()
        except (LeaseHeld, KeyboardInterrupt):
            raise
        except Exception as error:  # an unreachable store, missing credentials: in words, as check_writable says them
            if storage.is_remote(self.output) and not isinstance(error, storage.StorageError):
                raise storage.StorageError(storage.explain(self.output, error)) from None
            if not storage.is_url(self.output) and isinstance(error, OSError):  # a read-only or missing folder
                folder = os.path.dirname(self.output.rstrip("/")) or "."
                raise storage.StorageError(
                    f"cannot write to {folder} ({error.strerror or error}): the lease of "
                    f"{self.output} cannot be taken; choose a writable place"
                ) from None
            raise

    def _acquire(self) -> "Lease":
        with _held_lock:
            outer = _held.get(self.output)
        if outer is not None:  # this process already holds it (embed-release around embed)
            self.nested_in = outer
            return self
        self.nested_in = None
        waited = False
        while True:
            generations = self._generations()
            top = generations[-1] if generations else 0
            holder = self._read(top) if generations else None
            if generations and holder is None:  # released between the listing and the read, or torn
                time.sleep(0.05)
                holder = self._read(top)
            if holder is not None:
                age = _now() - float(holder.get("heartbeat", 0))
                gone = holder.get("host") == self.record["host"] and not _alive(int(holder.get("pid", -1)))
                if gone:
                    self.echo(
                        f"taking over the lease of {self.output}: its holder, pid {holder.get('pid')} on this host, "
                        "is gone (killed)"
                    )
                elif age <= self.stale_after:
                    message = (
                        f"{self.what} of {self.output} is held by {holder.get('owner')}@{holder.get('host')} "
                        f"pid {holder.get('pid')} since {_stamp(float(holder.get('started', 0)))} (last heartbeat "
                        f"{age:.0f} s ago; it heartbeats every {self.heartbeat:.0f} s and is taken over after "
                        f"{self.stale_after:.0f} s without one)"
                    )
                    if not self.wait:
                        raise LeaseHeld(message + "; wait for it, or rerun with --wait")
                    if not waited:
                        self.echo(message + "; waiting")
                        waited = True
                    time.sleep(self.poll)
                    continue
                else:
                    self.echo(
                        f"taking over the lease of {self.output} from {holder.get('owner')}@{holder.get('host')} pid "
                        f"{holder.get('pid')}: no heartbeat for {age:.0f} s"
                    )
            if self._create(top + 1):
                self.generation = top + 1
                for old in generations:  # a stale or released holder's objects
                    self._delete(old)
                break
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        with _held_lock:
            _held[self.output] = self
        return self

    def _delete(self, generation: int) -> None:
        fs, _ = self._base()
        try:
            fs.rm(self._path(generation))
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self.beat():
                return

    def beat(self) -> bool:
        """One heartbeat (the thread's, every ``heartbeat`` s): False once another writer holds a
        higher generation (the lease was taken over)."""
        if any(g > self.generation for g in self._generations()):
            self.lost = True
            return False
        self.record["heartbeat"] = _now()
        fs, _ = self._base()
        try:
            fs.pipe_file(self._path(self.generation), json.dumps(self.record).encode())
        except OSError:
            pass  # the next beat tries again; a long outage makes the lease stale, as it should
        return True

    def check(self) -> None:
        """Raise ``LeaseLost`` if another writer has taken the lease over (call between writes)."""
        if getattr(self, "nested_in", None) is not None:
            return self.nested_in.check()
        if self.lost:
            raise LeaseLost(
                f"the lease of {self.output} was taken over by another writer (this process's heartbeat "
                f"stalled past {self.stale_after:.0f} s); stopping before writing more"
            )

    def release(self) -> None:
        if getattr(self, "nested_in", None) is not None:
            self.nested_in = None
            return
        with _held_lock:
            if _held.get(self.output) is self:
                del _held[self.output]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is not None and not self.lost:
            current = self._read(self.generation)
            if current is not None and current.get("token") == self.record["token"]:
                self._delete(self.generation)
        self.generation = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_generation(output: str, generation: int) -> None:
    """Raise ``LeaseLost`` if ``output``'s lease has passed beyond ``generation``: the check of a
    process that writes under a lease another process holds (a Ray Train worker under its driver's)."""
    if any(g > generation for g in Lease(output, "")._generations()):
        raise LeaseLost(f"the lease of {output} was taken over by another writer; stopping before writing more")


__all__ = ["HEARTBEAT", "Lease", "LeaseHeld", "LeaseLost", "STALE_AFTER", "check_generation"]
