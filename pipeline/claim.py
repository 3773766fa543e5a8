"""An exclusive claim on a place (a store being created or changed, a run's folder): one holder at a time.

On a local filesystem the claim is a file its holder keeps locked (``flock``, mealv2.pipeline.locks): the
kernel lets go when the holder dies, however it dies and whichever PID namespace (container) it ran in, and
the next job takes the claim over at once; a pid test cannot tell that across namespaces, and once let a run
take a live run's folder. The file names its holder (host, pid, since) for messages only.

On object storage (s3://, gs://) there are no locks. The claim is an object made with an exclusive create
(S3's conditional put) that names its holder; whether that holder still runs cannot be known from here (another
machine, another container: its pid says nothing), so the claim is taken over only when its holder gave it up
(``abandon``) or once it is older than LEASE_SECONDS, a lease no holder needs (creating a store's metadata or
changing its attributes takes seconds). One job alone takes a claim over (a second exclusive create decides).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator

from mealv2.pipeline.locks import try_lock

LEASE_SECONDS = 120.0  # a claim on object storage older than this is its dead holder's: taken over
_POLL_SECONDS = 0.05


class ClaimTimeout(TimeoutError):
    """A claim still held by another job after the wait: the message names it and its holder."""


class Claim:
    """The claim file at ``path`` on the fsspec filesystem ``fs``."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.local = "file" in fs.protocol
        self._held: int | str | None = None  # while held: the locked descriptor (local) or the token (object storage)

    def take(self) -> bool:
        """Whether this job now holds the claim (taking over one given up, or a dead holder's); False while another
        holds it."""
        token = uuid.uuid4().hex
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "time": time.time(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = try_lock(self.path, create=True)
            if fd is None:
                return False
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except OSError as err:
                if err.errno not in (errno.EBADF, errno.EINVAL):  # a full disk: a claim naming no holder says nothing
                    os.remove(self.path)
                    os.close(fd)
                    raise
                # another user's claim file, opened read-only: locked all the same, its record left as it was
            self._held = fd
            return True
        held = self.holder()
        if held:
            takeover = f"{self.path}.takeover-{held.get('token')}"
            if not self._given_up(held) or not self._exclusive_create(takeover):
                return False
            self.fs.rm_file(self.path)  # one job alone gets here for this claim
            self.fs.rm_file(takeover)
        if not self._exclusive_create(self.path, record):
            return False
        # where an exclusive create is not atomic (some object stores), the last writer wins: read it back
        if self.holder().get("token") != token:
            return False
        self._held = token
        return True

    def release(self) -> None:
        """Remove the claim this job holds: the work is done."""
        if self.local:
            with contextlib.suppress(FileNotFoundError):  # removed by hand meanwhile
                os.remove(self.path)  # before the lock goes: a job that opens it then finds it gone, and makes its own
            os.close(self._held)
        elif self.holder().get("token") == self._held:
            self.fs.rm_file(self.path)
        self._held = None

    def abandon(self) -> None:
        """Let go of the claim but leave it in place, marked given up, so that the next job takes it over and
        resumes the work (locally a claim nobody holds locked is given up already)."""
        if self.local:
            os.close(self._held)
        else:
            held = self.holder()
            if held.get("token") == self._held:
                with contextlib.suppress(OSError):  # unmarked, it is taken over once its lease is out
                    self.fs.pipe_file(self.path, json.dumps({**held, "abandoned": True}).encode())
        self._held = None

    @contextlib.contextmanager
    def holding(self, wait_seconds: float, what: str) -> Iterator[None]:
        """Hold the claim for the block, waiting up to ``wait_seconds`` for another job to let go of it; the block's
        work is short and not resumed, so the claim is removed after it, even when it failed."""
        deadline = time.monotonic() + wait_seconds
        while not self.take():
            if time.monotonic() > deadline:
                raise ClaimTimeout(f"{self.path}: {what} is held by another job ({self.owner()}) for more than "
                                   f"{wait_seconds:.0f} s; if no such job runs, remove this file and run again")
            time.sleep(_POLL_SECONDS)
        try:
            yield
        finally:
            self.release()

    def holder(self) -> dict:
        """The holder's record ({} when nobody holds the claim, or the holder has not written it yet)."""
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return {}

    def owner(self) -> str:
        held = self.holder()
        return f"pid {held.get('pid')} on {held.get('host')} since {held.get('since')}"

    @staticmethod
    def _given_up(held: dict) -> bool:
        """A claim on object storage its holder gave up, or older than the lease."""
        return bool(held.get("abandoned")) or time.time() - float(held.get("time", 0)) > LEASE_SECONDS

    def _exclusive_create(self, path: str, data: bytes = b"") -> bool:
        """Create the object ``path`` holding ``data`` unless it exists (False then)."""
        try:
            with self.fs.open(path, "xb") as out:  # s3fs: a put with If-None-Match
                out.write(data)
        except FileExistsError:
            return False
        return True
