"""Where a label store is to be created: refuse to touch anything there, and let one job of many create it.

A new store is made only where nothing is (or in an empty folder). Jobs that start at
once (``--shard`` jobs from a scheduler) race for a claim file written with an exclusive
create (O_EXCL on a filesystem, a conditional put on S3); the winner creates the store,
the others wait until it opens. A claim whose process is gone (same machine, no such
pid) marks a creation that was killed: one job takes it over and creates the store
again over that partial store's files, which only a creation can have written.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Callable

import fsspec

CLAIM = ".mealv2-creating"  # inside the store's folder while one job creates it
CREATE_WAIT_SECONDS = 300.0  # writing a new store's metadata and index takes seconds, even on a bucket
_POLL_SECONDS = 0.2


class SiteError(ValueError):
    """The location cannot take a new store: the message names it and what is there."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class StoreSite:
    """The folder or prefix of a store that may not exist yet."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.claim_path = f"{self.root}/{CLAIM}"

    def create_once(self, ready: Callable[[], bool], create: Callable[[], object],
                    wait_seconds: float = CREATE_WAIT_SECONDS) -> bool:
        """Call ``create()`` if this job wins the creation (True), else wait until ``ready()`` (False).

        Refuses, touching nothing, a location that holds anything but a store or a creation.
        """
        deadline = time.monotonic() + wait_seconds
        while not ready():
            try:
                token = self._claim()
            except SiteError:
                if ready():  # the creator finished between the two looks
                    return False
                raise
            if token is not None:
                try:
                    create()
                finally:
                    self._release(token)
                return True
            if time.monotonic() > deadline:
                claim = self._read_claim()
                raise SiteError(f"{self.url}: still being created by another job ({_owner(claim)}) after "
                                f"{wait_seconds:.0f} s; if no such job runs, remove the partial store and run again")
            time.sleep(_POLL_SECONDS)
        return False

    def contents(self) -> list[str]:
        """Names directly under the location ([] when nothing is there); a file there counts as itself."""
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        if self.fs.isfile(self.root):
            return [self.root.rsplit("/", 1)[-1]]
        return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False))

    def _refuse(self, names: list[str]) -> SiteError:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return SiteError(f"{self.url}: exists and is not a label store (holds {shown}); nothing was changed: "
                         "choose a new path or an empty folder for --store")

    def _claim(self) -> str | None:
        """This job's claim token when it now owns the creation; None while another job's creation stands."""
        names = self.contents()
        if CLAIM in names:
            stale = self._read_claim()
            if not _abandoned(stale) or not self._exclusive_create(f"{self.claim_path}.takeover-{stale['token']}"):
                return None
            self.fs.rm_file(self.claim_path)  # one job alone gets here for this dead claim
            self.fs.rm_file(f"{self.claim_path}.takeover-{stale['token']}")
        elif names:
            raise self._refuse(names)
        token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not self._exclusive_create(self.claim_path, json.dumps(record).encode()):
            return None
        # where an exclusive create is not atomic (some object stores), the last writer wins: read it back
        return token if self._read_claim().get("token") == token else None

    def _exclusive_create(self, path: str, data: bytes = b"") -> bool:
        """Create ``path`` holding ``data`` unless it exists (False then)."""
        try:
            if "file" in self.fs.protocol:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
                    out.write(data)
            else:
                with self.fs.open(path, "xb") as out:  # s3fs: a put with If-None-Match
                    out.write(data)
        except FileExistsError:
            return False
        return True

    def _release(self, token: str) -> None:
        """Remove this job's claim: after the store's attributes are written, or when creating failed."""
        if self._read_claim().get("token") == token:
            self.fs.rm_file(self.claim_path)

    def _read_claim(self) -> dict:
        try:
            return json.loads(self.fs.cat_file(self.claim_path))
        except (FileNotFoundError, ValueError):
            return {}


def _owner(claim: dict) -> str:
    return f"pid {claim.get('pid')} on {claim.get('host')} since {claim.get('since')}"


def _abandoned(claim: dict) -> bool:
    """A claim whose process is known to be gone: made on this machine by a pid that no longer runs."""
    return bool(claim.get("token")) and claim.get("host") == socket.gethostname() and \
        not _pid_alive(int(claim.get("pid", 0)))
