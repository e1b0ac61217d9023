"""One run at a time on a folder: a lease file, taken atomically, renewed, fenced.

A generation run takes ``OUT/lease.json`` before it pays for anything or loads a model:

- **Taken atomically.** Locally the file is created with a hard link of a complete
  temporary file (it fails when the name exists, like ``O_EXCL``, and a reader never sees
  it half-written); on S3 with a conditional put (``If-None-Match: *``, boto3: pyarrow's
  S3 filesystem cannot send the header). Other URIs (gs://, ...) get a best-effort
  lease: read, then write, with a warning.
- **Renewed** every ``renew_s`` seconds by the driver (:meth:`Lease.start_renewing`).
  Each renewal replaces the file only if it is still the one this run wrote (the
  ETag on S3; compared under a lock locally), so a run whose lease was taken over finds
  out at its next renewal.
- **Expired** when the file's modification time, as the store reports it, is more than
  ``ttl_s`` seconds behind the store's own clock (a probe file's modification time), so
  the writer's clock plays no part. Only an expired lease may be taken over, and only
  when asked (``--take-over-lease``).
- **Fenced.** Before publishing a part, a plan log or the manifest the writer calls
  :meth:`LeaseToken.check`, which reads the file back: a run that lost OUT publishes
  nothing more, and stops with :class:`~raypipe.errors.LeaseLost` (exit status 75).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import pyarrow.fs as pafs

from raypipe import storage
from raypipe.errors import LeaseExpired, LeaseHeld, LeaseLost

log = logging.getLogger(__name__)

#: The lease's file name in OUT.
LEASE_FILE = "lease.json"


# ---------------------------------------------------------------------------------------
# Where the lease file lives: local disk, S3 (conditional puts), other URIs
# ---------------------------------------------------------------------------------------


@dataclass
class Stored:
    """The lease file as read: its content, a version to replace it against, its mtime."""

    holder: dict[str, Any]
    version: str
    mtime: float


class _LocalFile:
    """Local disk: create by hard link (atomic, fails if present); replace under flock."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LEASE_FILE)

    def _staged(self, data: bytes) -> str:
        os.makedirs(self.folder, exist_ok=True)
        tmp = os.path.join(self.folder, storage.tmp_name(LEASE_FILE))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> bool:
        tmp = self._staged(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def read(self) -> Stored | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Stored(json.loads(raw), _digest(raw), mtime)

    def _locked(self):
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, ".lease.lock"), os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def replace(self, data: bytes, version: str) -> bool:
        fd = self._locked()  # released when closed
        try:
            now = self.read()
            if now is None or now.version != version:
                return False
            os.replace(self._staged(data), self.path)
            return True
        finally:
            os.close(fd)

    def delete(self, version: str) -> None:
        fd = self._locked()
        try:
            now = self.read()
            if now is not None and now.version == version:
                os.unlink(self.path)
        finally:
            os.close(fd)

    def now(self) -> float:
        return _probe_clock(pafs.LocalFileSystem(), self.folder)


class _S3File:
    """S3 (and S3-compatible stores): conditional puts and deletes through boto3."""

    def __init__(self, location: str) -> None:
        import boto3

        base, _, query = location.partition("?")
        options = {k: v[-1] for k, v in parse_qs(query).items()}
        bucket_key = base.split("://", 1)[1].strip("/")
        self.bucket, _, prefix = bucket_key.partition("/")
        self.key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        endpoint = options.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
        self.client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=options.get("region") or None
        )
        self.fs, self.folder = storage.open_location(location)

    def _error_code(self, e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def create(self, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            if self._error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise

    def read(self) -> Stored | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._error_code(e) in ("NoSuchKey", "404"):
                return None
            raise
        raw = got["Body"].read()
        return Stored(json.loads(raw), got["ETag"], got["LastModified"].timestamp())

    def replace(self, data: bytes, version: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, IfMatch=version)
            return True
        except ClientError as e:
            if self._error_code(e) in (
                "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "404"
            ):  # fmt: skip
                return False
            raise

    def delete(self, version: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except ClientError as e:
            if self._error_code(e) not in ("PreconditionFailed", "NoSuchKey", "412", "404"):
                raise

    def now(self) -> float:
        return _probe_clock(self.fs, self.folder)


class _OtherFile:
    """Other URIs (gs://, abfs://, hdfs://): read-then-write, not atomic (warned)."""

    def __init__(self, location: str) -> None:
        self.fs, self.folder = storage.open_location(location)
        self.path = f"{self.folder}/{LEASE_FILE}"
        log.warning(
            "the lease on %s is best effort (read, then write): two runs started within "
            "the same second may both take it. s3:// and local OUT take it atomically.",
            _show(location),
        )

    def create(self, data: bytes) -> bool:
        if self.read() is not None:
            return False
        storage.publish(self.fs, self.path, data)
        return True

    def read(self) -> Stored | None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            return None
        raw = storage.read_bytes(self.fs, self.path)
        return Stored(json.loads(raw), _digest(raw), info.mtime.timestamp())

    def replace(self, data: bytes, version: str) -> bool:
        now = self.read()
        if now is None or now.version != version:
            return False
        storage.publish(self.fs, self.path, data)
        return True

    def delete(self, version: str) -> None:
        now = self.read()
        if now is not None and now.version == version:
            self.fs.delete_file(self.path)

    def now(self) -> float:
        return _probe_clock(self.fs, self.folder)


def _show(location: str) -> str:
    """The folder as users name it (a URI without its query options)."""
    return str(location).partition("?")[0]


def _digest(raw: bytes) -> str:
    import hashlib

    return hashlib.sha256(raw).hexdigest()


def _probe_clock(fs: pafs.FileSystem, folder: str) -> float:
    """The store's clock: the modification time it gives a file written now."""
    probe = f"{folder}/{storage.tmp_name('clock')}"
    storage.publish(fs, probe, b"")
    try:
        return fs.get_file_info(probe).mtime.timestamp()
    finally:
        fs.delete_file(probe)


def _lease_file(location: str):
    if not storage.is_uri(location):
        return _LocalFile(storage.open_location(location)[1])
    if location.startswith("s3://"):
        return _S3File(location)
    return _OtherFile(location)


# ---------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------


class LeaseToken:
    """What the run's actors carry to fence their writes: where the lease is and whose."""

    def __init__(self, location: str, run_id: str) -> None:
        self.location = location
        self.run_id = run_id
        self._file = None  # opened on first use, in the process that checks

    def __reduce__(self):
        return (LeaseToken, (self.location, self.run_id))

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds the lease."""
        if self._file is None:
            self._file = _lease_file(self.location)
        stored = self._file.read()
        if stored is None or stored.holder.get("run_id") != self.run_id:
            raise LeaseLost(lost_message(self.location, stored))


def describe(holder: dict[str, Any]) -> str:
    renewed = holder.get("renewed_at")
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, started "
        f"{_utc(holder.get('started_at'))}, last renewed {_utc(renewed)}"
    )


def _utc(t: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "never"


def lost_message(location: str, stored: Stored | None) -> str:
    who = describe(stored.holder) if stored else "nobody (the file was deleted)"
    return (
        f"this run lost the lease on {_show(location)}: it is now held by {who}. "
        "It published nothing after that. Run the same command again once that run has "
        "ended to continue."
    )


class Lease:
    """This run's lease on a folder (see the module docstring).

    Args:
        location: the folder (local path or URI) the lease guards.
        ttl_s: seconds after its last renewal (store clock) at which a lease has expired.
        renew_s: seconds between renewals (well under ``ttl_s``).
    """

    def __init__(self, location: str, ttl_s: float, renew_s: float) -> None:
        if renew_s >= ttl_s:
            raise ValueError(f"lease renew_s ({renew_s}) must be below ttl_s ({ttl_s})")
        self.location = location
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.run_id = uuid.uuid4().hex
        self.file = _lease_file(location)
        self.holder = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
            "renewed_at": time.time(),
            "ttl_s": ttl_s,
        }
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    def token(self) -> LeaseToken:
        return LeaseToken(self.location, self.run_id)

    def _bytes(self) -> bytes:
        return json.dumps(self.holder, sort_keys=True).encode()

    def acquire(self, take_over: bool = False) -> Lease:
        """Take the lease, or raise :class:`LeaseHeld` (a live holder) or
        :class:`LeaseExpired` (a dead holder's lease, without ``take_over``)."""
        data = self._bytes()
        if self.file.create(data):
            self._version = self.file.read().version
            return self
        stored = self.file.read()
        if stored is None:  # released between the two calls
            return self.acquire(take_over)
        age = self.file.now() - stored.mtime
        where = _show(self.location)
        if age < self.ttl_s:
            raise LeaseHeld(
                f"{where} is in use by another run ({describe(stored.holder)}; its lease "
                f"expires {self.ttl_s - age:.0f} s after its last renewal unless renewed). "
                "Wait for that run to end, or give this run another --out. If that run is "
                f"dead, --take-over-lease is allowed once its lease expired (lease_ttl_s="
                f"{self.ttl_s:g})."
            )
        if not take_over:
            raise LeaseExpired(
                f"{where} holds the lease of a run that stopped renewing it "
                f"{age:.0f} s ago ({describe(stored.holder)}): that run was probably killed. "
                "If it is gone, run the same command with --take-over-lease to continue."
            )
        if not self.file.replace(data, stored.version):
            raise LeaseHeld(f"another run took over the lease on {where} at the same time")
        log.warning("took over the expired lease on %s (%s)", where, describe(stored.holder))
        self._version = self.file.read().version
        return self

    def renew(self) -> None:
        """Rewrite the lease (its mtime is the renewal); raise :class:`LeaseLost` if it is
        no longer this run's."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            self.holder["renewed_at"] = time.time()
            if self.file.replace(self._bytes(), self._version):
                self._version = self.file.read().version
                return
            self.lost = LeaseLost(lost_message(self.location, self.file.read()))
            raise self.lost

    def check(self) -> None:
        """The driver's fence (see :meth:`LeaseToken.check`)."""
        if self.lost is not None:
            raise self.lost
        try:
            self.token().check()
        except LeaseLost as e:
            self.lost = e
            raise

    def start_renewing(self) -> None:
        def loop() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(self.renew_s):
                try:
                    self.renew()
                    last_ok = time.monotonic()
                except LeaseLost as e:
                    log.error("%s", e)
                    return
                except Exception as e:  # noqa: BLE001 - a store hiccup: try again
                    log.warning("could not renew the lease on %s: %s", self.location, e)
                    if time.monotonic() - last_ok >= self.ttl_s:
                        self.lost = LeaseLost(
                            f"could not renew the lease on {_show(self.location)} for "
                            f"{self.ttl_s:g} s (lease_ttl_s): another run may take it now, so "
                            "this run stopped. Run the same command again to continue."
                        )
                        return

        self._thread = threading.Thread(target=loop, name="raypipe-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.lost is None and self._version is not None:
                self.file.delete(self._version)
            self._version = None
