"""Local paths and object-storage URLs (``s3://``, ``gs://``, any fsspec URL) behind one small API,
for run directories, checkpoints and indexes. Credentials come from the standard environment
variables and profiles of each backend (``AWS_*``, ``AWS_ENDPOINT_URL`` for S3-compatible servers),
never from files in the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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


def replace_tree(new, final) -> None:
    """Replace the directory ``final`` by the complete directory ``new`` (an ``--overwrite`` that
    built its output beside the old one). Local: renames (the old one moved aside first, deleted
    last). Object storage has no rename: the old objects are deleted, then the new ones copied."""
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
    fs, final_path = filesystem(final)
    _, new_path = filesystem(new)
    if fs.exists(final_path):
        fs.rm(final_path, recursive=True)
    fs.copy(new_path, final_path, recursive=True)
    fs.rm(new_path, recursive=True)


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


def check_writable(path) -> None:
    """Create ``path`` and write, read and delete a probe file in it; raise ``StorageError`` with
    the reason in words if that fails, before any work is done."""
    probe = join(path, ".hvae-write-test")
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
    "read_text",
    "remove_tree",
    "replace_tree",
    "upload",
    "write_text",
]
