"""Local paths and object-storage URLs (``s3://``, ``gs://``, any fsspec URL) behind one small API,
for run directories, checkpoints and indexes. Credentials come from the standard environment
variables and profiles of each backend (``AWS_*``, ``AWS_ENDPOINT_URL`` for S3-compatible servers),
never from files in the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from . import faults


def is_url(path) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ``file://``, ...) rather than a plain path."""
    return "://" in str(path)


def is_remote(path) -> bool:
    """Whether ``path`` lives off this machine: a URL other than ``file://``."""
    return is_url(path) and not str(path).startswith("file://")


def join(base, *parts: str) -> str:
    text = str(base)
    for part in parts:
        text = f"{text.rstrip('/')}/{part}" if is_url(text) else str(Path(text) / part)
    return text


def basename(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str):
    """fsspec filesystem and the path inside it, for local paths and URLs alike."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(url))


def exists(path) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def read_text(path) -> str:
    fs, inner = filesystem(path)
    with fs.open(inner, "r") as handle:
        return handle.read()


def write_text(path, text: str) -> None:
    """Replace the file in one step: a rename locally, a single PUT on object storage."""
    if not is_url(path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
        return
    fs, inner = filesystem(path)
    with fs.open(inner, "w") as handle:
        handle.write(text)


def makedirs(path) -> None:
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def listdir(path) -> list[str]:
    """Names (not paths) of the entries of a directory; empty when it does not exist."""
    fs, inner = filesystem(path)
    if is_remote(path):
        fs.invalidate_cache(inner)  # another process or client (zarr's own) may have written since
    if not fs.exists(inner):
        return []
    return sorted(basename(entry) for entry in fs.ls(inner, detail=False))


def remove_tree(path) -> None:
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def upload(local: Path, url: str, last: str | None = None) -> None:
    """Copy a local file or directory to ``url``; with ``last``, that file of the directory is
    written after all others, so its presence marks a complete copy (object stores have no
    atomic directory rename)."""
    fs, inner = filesystem(url)
    local = Path(local)
    if local.is_file():
        fs.put_file(str(local), inner)
        return
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)
    for file in files:
        target = f"{inner.rstrip('/')}/{file.relative_to(local).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)


def download(url: str, local: Path) -> Path:
    fs, inner = filesystem(url)
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for entry in fs.find(inner):
        target = local / entry[len(inner.rstrip("/")) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(entry, str(target))
    return local


def replace_tree(new, final, legacy=None) -> None:
    """Replace the directory ``final`` by the complete directory ``new`` (an ``--overwrite`` that
    built its output beside the old one). Local: renames (the old one moved aside first, deleted
    last). Object storage has no rename: ``new`` is a version of ``final`` (:func:`staging_path`),
    published by :func:`publish`, so readers see the old output until one small write shows them
    the new one (``legacy``: as there)."""
    if not is_remote(final):
        aside = _aside(final)
        if aside.exists():
            shutil.rmtree(aside)
        if Path(final).exists():
            os.replace(final, aside)
            faults.point("replace.aside")
        os.replace(new, final)
        faults.point("replace.swapped")
        shutil.rmtree(aside, ignore_errors=True)
        return
    if not str(new).startswith(join(final, VERSIONS) + "/"):
        raise ValueError(f"{new} is not a version of {final}: build it at storage.staging_path({final!r})")
    publish(new, final, legacy)


# Object storage has no atomic rename of a directory: an output there is written as a version
# (<output>/_versions/<name>/) and published by one small write of <output>/_published.json
# naming it (the Delta / Iceberg pattern); readers open resolve(<output>).
POINTER = "_published.json"
VERSIONS = "_versions"


def published_version(path) -> str | None:
    """The version name the publication record of ``path`` names; None for an output that has no
    record (a local one, or one written before outputs were versioned)."""
    if not is_remote(path):
        return None
    pointer = join(path, POINTER)
    try:
        text = read_text(pointer)
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - unreachable store, credentials, permissions
        raise StorageError(explain(pointer, error)) from None
    try:
        return str(json.loads(text)["version"])
    except (ValueError, KeyError, TypeError):
        raise StorageError(f"{pointer} is not a publication record (no version in it)") from None


def resolve(path) -> str:
    """Where the published output at ``path`` lies: on object storage, the version its
    publication record names (``<path>/_versions/<name>``); otherwise ``path`` itself. Readers
    (``read_embeddings``, the shard loader, ``evaluate``, ``query``) open this path; a tool of
    your own (xarray, dask, zarr) opens ``resolve(url)`` too."""
    version = published_version(path)
    return str(path) if version is None else join(path, VERSIONS, version)


def staging_path(final) -> str:
    """Where a writer builds the next version of the object-storage output ``final``: the
    unpublished version a killed run left (the writer's lease makes it this run's to resume or
    clear), or a fresh one named by the time and a random suffix."""
    published = published_version(final)
    left = [name for name in listdir(join(final, VERSIONS)) if name != published]
    name = max(left) if left else f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    return join(final, VERSIONS, name)


def publish(version, final, legacy=None) -> None:
    """Make the complete ``version`` (a path under ``final``'s versions) the output readers see,
    in one step: a single PUT of the publication record. Only then are older versions removed:
    all but the one just replaced, which stays until the next publication so that a reader who
    opened it (a notebook's lazy arrays, a training job) can finish. Where ``legacy(name)`` says an
    entry at the top of ``final`` is one this tool wrote before outputs were versioned, that entry
    is removed too."""
    name, replaced = basename(version), published_version(final)
    record = {"version": name, "published": datetime.now(timezone.utc).isoformat(), "replaced": replaced}
    write_text(join(final, POINTER), json.dumps(record))
    faults.point("publish.pointer")
    for old in listdir(join(final, VERSIONS)):
        if old not in (name, replaced):
            remove_tree(join(final, VERSIONS, old))
    if legacy is not None:
        for entry in listdir(final):
            if entry not in (POINTER, VERSIONS) and legacy(entry):
                remove_tree(join(final, entry))


def _aside(final) -> Path:
    """Where ``replace_tree`` moves the old output while the new one is moved in."""
    return Path(str(final).rstrip("/") + ".replaced")


def recover_replace(final) -> None:
    """Finish or undo a local ``replace_tree`` that a killed job cut short: with the old output
    moved aside and the new one not yet in place, the old one goes back (the rerun's --overwrite
    swaps the new one in); with both done, the old copy aside is deleted."""
    if is_remote(final):
        return
    aside = _aside(final)
    if not aside.exists():
        return
    if Path(final).exists():
        shutil.rmtree(aside)
    else:
        os.replace(aside, final)


class StorageError(ValueError):
    """Object storage that cannot be used, with the reason in words (exit status 2 in the CLI)."""


def explain(url, error: BaseException) -> str:
    """What went wrong with ``url``, in words: unreachable endpoint, missing credentials, no
    permission, missing bucket; otherwise the error itself."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = f"{type(error).__name__}: {error}"
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return (
            f"{url}: no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an "
            f"instance / workload role; public buckets need anonymous access)"
        )
    if (
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ClientConnectorError",
            "ConnectionRefusedError",
            "ServerDisconnectedError",
        }
        or "Could not connect to the endpoint" in text
    ):
        return f"{url}: cannot reach the object store at {endpoint} ({text})"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"{url}: permission denied ({text}); check the credentials' rights on this bucket and prefix"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or "The specified bucket" in text:
        return f"{url}: the bucket does not exist ({text})"
    return f"{url}: {text}"


PROBE = ".hvae-write-test"  # check_writable's probe files start so


def check_writable(path) -> None:
    """Create ``path`` and write, read and delete a probe file in it; raise ``StorageError`` with
    the reason in words if that fails, before any work is done."""
    probe = join(path, f"{PROBE}-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # jobs at once: one probe each
    try:
        if not is_remote(path):
            makedirs(path)  # object stores have no directories (and s3fs would create a missing bucket)
        write_text(probe, "ok")
        read_text(probe)
        remove_tree(probe)
    except Exception as error:  # noqa: BLE001 - every backend raises its own types
        if not is_url(path) and isinstance(error, OSError):
            raise StorageError(f"cannot write to {path} ({error.strerror or error})") from None
        raise StorageError(explain(path, error)) from None


def cached_copy(url: str) -> Path:
    """A local copy of the remote directory ``url`` under ``$HVAE_CACHE`` (default
    ~/.cache/hvae-pipeline), downloaded once; concurrent callers (Ray actors on one node) each
    download to a temporary directory and the first rename wins."""
    root = Path(os.environ.get("HVAE_CACHE", Path.home() / ".cache" / "hvae-pipeline")) / "checkpoints"
    target = root / (hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + basename(url))
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    download(url, temporary)
    try:
        os.rename(temporary, target)
    except OSError:  # another process finished first
        shutil.rmtree(temporary, ignore_errors=True)
    return target


__all__ = [
    "StorageError",
    "basename",
    "cached_copy",
    "check_writable",
    "explain",
    "download",
    "exists",
    "filesystem",
    "is_remote",
    "is_url",
    "join",
    "listdir",
    "makedirs",
    "publish",
    "published_version",
    "read_text",
    "remove_tree",
    "replace_tree",
    "resolve",
    "staging_path",
    "upload",
    "write_text",
]
