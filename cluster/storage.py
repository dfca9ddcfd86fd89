"""Where run state lives: a local (or mounted) folder, or an object store, through one small API.

`cluster.storage` is either a path (`./runs`, `/mnt/tandem` on a shared mount) or a URI
(`s3://bucket/runs`, `gs://bucket/runs`). Every byte of run state goes through a `Location`:
run folders, metrics, manifests, artifacts, tuning results, reports. Ray Train and Ray Tune get
the same URI as their `storage_path` and write checkpoints there themselves.

Built on pyarrow.fs, not fsspec: Ray Train, Ray Tune and Ray Data resolve the same URIs with it,
so one set of credential rules and one endpoint override hold for Tandem and for Ray alike, and
it ships with Ray Data (no new dependency). Credentials never come from the config: the store's
own environment does it (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or
AWS_PROFILE, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for an S3-compatible server;
GOOGLE_APPLICATION_CREDENTIALS for gs://). `STORE_ENV` lists what a job or a pod must carry.

Safety on an object store: an object appears whole or not at all (one PUT), so a file written
with `put_bytes` is never seen half-written; an artifact folder is published file by file with
its manifest last (the manifest is the publish marker), and every load checks each file's sha256
against it (cluster/artifacts.py). Local writes stay atomic renames with fsync, as before.

Imports nothing from Tandem but cluster.errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cluster.errors import TandemError

# What a submitted job, a RayJob or a Serve application needs to reach the store as the
# submitter does: the variables the stores' own tools read (boto3, the AWS CLI, pyarrow, gcloud).
STORE_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
CACHE_ENV = "TANDEM_CACHE_DIR"
DOWNLOADS_LOG = "downloads.jsonl"


class StorageError(TandemError, RuntimeError):
    """The store cannot be reached, or a file in it is missing; the message names the location and the fix."""


def is_uri(where: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://, gs://, ...); a plain path or file:// is local."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


def store_env() -> dict[str, str]:
    """The store variables set in this process, for a job's or an application's runtime_env."""
    return {name: os.environ[name] for name in STORE_ENV if os.environ.get(name)}


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, env: tuple[tuple[str, str], ...]) -> Any:
    """One pyarrow filesystem per store and per set of store variables (`env`, part of the cache
    key so that a changed endpoint or key is used at once, never a client made for the old one)."""
    import pyarrow.fs as pafs

    filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}")
    return filesystem


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (replicas and
        # Kubernetes pods may read artifacts as another user).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: without this a power loss can bring back the old directory entry."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) refuse fsync on a directory
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Location:
    """A file or folder in local storage or an object store. `str()` gives the path or the URI."""

    uri: str

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def scheme(self) -> str:
        return urlparse(self.uri).scheme if self.remote else ""

    @property
    def fs_path(self) -> str:
        """The path pyarrow's filesystem takes: 'bucket/key' for a URI, the absolute path otherwise."""
        if not self.remote:
            return self.uri
        parsed = urlparse(self.uri)
        return f"{parsed.netloc}{parsed.path}".rstrip("/")

    @property
    def filesystem(self) -> Any:
        if not self.remote:
            import pyarrow.fs as pafs

            return pafs.LocalFileSystem()
        parsed = urlparse(self.uri)
        return _filesystem(parsed.scheme, parsed.netloc, tuple(sorted(store_env().items())))

    @property
    def path(self) -> Path:
        """The local path; refused for an object store (the caller must go through the Location)."""
        if self.remote:
            raise StorageError(f"{self.uri} is in an object store, not a local path")
        return Path(self.uri)

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.uri.rstrip("/").rsplit("/", 1)[0]) if self.remote else Location(str(Path(self.uri).parent))

    def __truediv__(self, part: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{part}") if self.remote else Location(str(Path(self.uri) / part))

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """A local Location is a path for open(), Path() and the libraries; a URI is not."""
        if self.remote:
            raise StorageError(f"{self.uri} is in an object store, not a local path")
        return self.uri

    # reads ------------------------------------------------------------------------------------
    def _info(self) -> Any:
        try:
            return self.filesystem.get_file_info(self.fs_path)
        except OSError as exc:
            raise StorageError(f"{self.uri} cannot be read ({_short(exc)}); {CREDENTIALS_HINT}") from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        if not self.remote:
            return Path(self.uri).is_dir()
        # An object store has no folders, only keys with a common prefix.
        return self._info().type == pafs.FileType.Directory or bool(self.children())

    def read_bytes(self) -> bytes:
        if not self.remote:
            return Path(self.uri).read_bytes()
        try:
            with self.filesystem.open_input_stream(self.fs_path) as handle:
                return handle.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "not found" in str(exc).lower() or "NoSuchKey" in str(exc):
                raise FileNotFoundError(self.uri) from None
            raise StorageError(f"{self.uri} cannot be read ({_short(exc)}); {CREDENTIALS_HINT}") from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def children(self) -> list[Location]:
        """The entries directly inside this folder (none when it does not exist)."""
        import pyarrow.fs as pafs

        if not self.remote:
            folder = Path(self.uri)
            return [Location(str(p)) for p in sorted(folder.iterdir())] if folder.is_dir() else []
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"{self.uri} cannot be listed ({_short(exc)}); {CREDENTIALS_HINT}") from None
        return [self / info.base_name for info in sorted(infos, key=lambda i: i.base_name)]

    def files_below(self) -> list[Location]:
        """Every file under this folder, at any depth, sorted (one listing request in an object store)."""
        import pyarrow.fs as pafs

        if not self.remote:
            return [Location(str(p)) for p in sorted(Path(self.uri).rglob("*")) if p.is_file()]
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=True))
        except OSError as exc:
            raise StorageError(f"{self.uri} cannot be listed ({_short(exc)}); {CREDENTIALS_HINT}") from None
        prefix = f"{self.scheme}://"
        return sorted((Location(prefix + info.path) for info in infos if info.type == pafs.FileType.File), key=str)

    def stat(self) -> tuple[int, int]:
        """(modification time in ns, size in bytes), from one request."""
        info = self._info()
        mtime = int(info.mtime.timestamp() * 1e9) if info.mtime is not None else 0
        return mtime, int(info.size or 0)

    # writes -----------------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> None:
        """Write the whole file so that a reader sees the old one or the new one, never a part."""
        if not self.remote:
            atomic_write_bytes(Path(self.uri), data)
            return
        try:
            # One PUT: an object store shows an object only once it is complete.
            with self.filesystem.open_output_stream(self.fs_path) as handle:
                handle.write(data)
        except OSError as exc:
            raise StorageError(f"{self.uri} cannot be written ({_short(exc)}); {CREDENTIALS_HINT}") from None

    def put_text(self, text: str) -> None:
        self.put_bytes(text.encode())

    def put_json(self, value: Any) -> None:
        self.put_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")

    def append_line(self, line: str) -> None:
        """Append one line. An object store has no append: the file is read and written again
        whole (fine for metrics.jsonl, one line per epoch from one writer)."""
        if not self.remote:
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            with open(self.uri, "a") as handle:
                handle.write(line + "\n")
            return
        try:
            old = self.read_bytes()
        except FileNotFoundError:
            old = b""
        self.put_bytes(old + (line + "\n").encode())

    def make_dirs(self) -> None:
        """Create the folder (local); an object store needs none."""
        if not self.remote:
            Path(self.uri).mkdir(parents=True, exist_ok=True)

    def delete_tree(self) -> None:
        if not self.remote:
            shutil.rmtree(self.uri, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError, OSError):
            self.filesystem.delete_dir(self.fs_path)

    def upload_file(self, source: Path) -> None:
        """Copy a local file here (one object, complete or absent)."""
        if not self.remote:
            atomic_write_bytes(Path(self.uri), Path(source).read_bytes())
            return
        import pyarrow.fs as pafs

        try:
            pafs.copy_files(str(source), self.fs_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.filesystem)
        except OSError as exc:
            raise StorageError(f"{self.uri} cannot be written ({_short(exc)}); {CREDENTIALS_HINT}") from None

    def download_file(self, target: Path) -> None:
        import pyarrow.fs as pafs

        try:
            pafs.copy_files(self.fs_path, str(target), source_filesystem=self.filesystem, destination_filesystem=pafs.LocalFileSystem())
        except OSError as exc:
            raise StorageError(f"{self.uri} cannot be read ({_short(exc)}); {CREDENTIALS_HINT}") from None


CREDENTIALS_HINT = (
    "check the bucket name and the store's credentials in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
    "AWS_PROFILE, AWS_ENDPOINT_URL for an S3-compatible server, GOOGLE_APPLICATION_CREDENTIALS for gs://)"
)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def location(where: str | os.PathLike | Location) -> Location:
    """A Location from a path (made absolute: Ray Train needs absolute paths) or a URI."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if text.startswith("file://"):
        text = urlparse(text).path
    if is_uri(text):
        return Location(text.rstrip("/"))
    return Location(str(Path(text).expanduser().resolve()))


def location_of(filesystem: Any, fs_path: str) -> Location:
    """The Location of a path on a pyarrow filesystem, as Ray hands them out (a Result's or a
    Checkpoint's `filesystem` and `path`): the inverse of Location.filesystem and .fs_path."""
    kind = filesystem.type_name
    if kind == "local":
        return location(fs_path)
    if kind not in ("s3", "gcs"):
        raise StorageError(f"{fs_path} is on a {kind} filesystem; Tandem's storage is a folder, s3:// or gs://")
    return Location(f"{'gs' if kind == 'gcs' else kind}://{fs_path.lstrip('/')}")


def native(where: Location) -> Path | Location:
    """A local Location as the Path callers of Tandem's API expect; a URI stays a Location."""
    return where if where.remote else Path(where.uri)


def reachable_problem(root: Location) -> str | None:
    """Why the store of `root` cannot be used from here, or None: a missing bucket, missing or
    refused credentials, an endpoint that does not answer."""
    if not root.remote:
        return None
    bucket = Location(f"{root.scheme}://{urlparse(root.uri).netloc}")
    try:
        import pyarrow.fs as pafs

        info = bucket.filesystem.get_file_info(bucket.fs_path)
        if info.type == pafs.FileType.NotFound:
            return f"bucket {bucket.uri} does not exist (or these credentials cannot see it); create it or fix cluster.storage"
        bucket.filesystem.get_file_info(pafs.FileSelector(root.fs_path, allow_not_found=True))
    except (OSError, StorageError) as exc:
        return f"{root.uri} cannot be reached: {_short(exc)}; {CREDENTIALS_HINT}"
    return None


# The per-node artifact cache ---------------------------------------------------------------------


def cache_dir() -> Path:
    """This node's artifact cache: $TANDEM_CACHE_DIR, else ~/.cache/tandem (per node: nodes share no disk)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tandem")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes of this node (two replicas fetching one file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_blob(source: Location, sha256: str) -> Path:
    """The local copy of one file whose content has this sha256, downloaded only when this node
    has none. Keyed by the content's hash, so a changed file is a new key, never a stale hit."""
    blobs = cache_dir() / "blobs"
    blob = blobs / sha256
    blobs.mkdir(parents=True, exist_ok=True)
    with _locked(blobs / f".{sha256}.lock"):
        if blob.is_file():
            return blob
        started = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=blobs, prefix=f".{sha256}.", suffix=".part")
        os.close(fd)
        try:
            source.download_file(Path(tmp))
            actual = sha256_file(Path(tmp))
            if actual != sha256:
                raise StorageError(
                    f"{source.uri} fails its checksum on download: sha256 {actual} but its manifest records {sha256}; the file was "
                    "altered or is being replaced, refusing to load it. Export or train again"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, blob)
        finally:
            Path(tmp).unlink(missing_ok=True)
        record = {"uri": source.uri, "sha256": sha256, "bytes": blob.stat().st_size, "seconds": round(time.perf_counter() - started, 3)}
        record.update(pid=os.getpid(), time=time.time())
        with open(cache_dir() / DOWNLOADS_LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return blob


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_folder(source: Location, manifest_name: str = "manifest.json") -> Path:
    """A local folder holding an artifact of the store: its manifest and every file it lists.

    Files come from this node's cache by sha256 (downloaded once per node, whichever replica or
    predict actor asks first); the folder is rebuilt from hard links for each manifest, so a
    changed artifact is a new folder. The loader still checks every file against the manifest.
    """

    if not source.remote:
        return source.path
    manifest_bytes = (source / manifest_name).read_bytes()
    manifest = json.loads(manifest_bytes)
    key = hashlib.sha256(source.uri.encode() + b"\0" + manifest_bytes).hexdigest()[:24]
    folder = cache_dir() / "artifacts" / key
    if (folder / manifest_name).is_file():
        return folder
    cache_dir().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".artifact-"))
    try:
        for name, entry in sorted((manifest.get("files") or {}).items()):
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                raise StorageError(f"{source / manifest_name}: entry {name!r} is not a file name of its folder; refusing it")
            blob = _fetch_blob(source / name, entry["sha256"])
            os.link(blob, staging / name)
        atomic_write_bytes(staging / manifest_name, manifest_bytes)  # the folder itself appears by one rename below
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another process built the same folder first
            if not (folder / manifest_name).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def publish_folder(source: Path, target: Location, manifest_name: str = "manifest.json") -> None:
    """Copy a local artifact folder to `target`, the manifest last: a reader that finds the new
    manifest finds every file it lists. Files whose bytes are already there are not sent again."""
    if not target.remote and Path(target.uri).resolve() == Path(source).resolve():
        return
    manifest = json.loads((Path(source) / manifest_name).read_text())
    try:
        there = json.loads((target / manifest_name).read_bytes()).get("files") or {}
    except (FileNotFoundError, ValueError):
        there = {}
    for name, entry in sorted((manifest.get("files") or {}).items()):
        if (there.get(name) or {}).get("sha256") != entry["sha256"]:
            (target / name).upload_file(Path(source) / name)
    (target / manifest_name).upload_file(Path(source) / manifest_name)


def downloads() -> list[dict[str, Any]]:
    """Every download this node's cache made (one JSON line each)."""
    path = cache_dir() / DOWNLOADS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
