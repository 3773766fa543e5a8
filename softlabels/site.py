"""Where a label store is to be created: refuse to touch anything there, and let one job of many create it.

A new store is made only where nothing is (or in an empty folder). Jobs that start at
once (``--shard`` jobs from a scheduler) race for a claim file written with an exclusive
create (O_EXCL on a filesystem, a conditional put on S3); the winner creates the store,
the others wait until it opens, and nothing that was there before is ever removed.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

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
        self._token: str | None = None

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

    def claim(self) -> bool:
        """True when this job now owns the creation; False when another job does. Refuses an occupied site."""
        names = self.contents()
        if CLAIM in names:
            return False
        if names:
            raise self._refuse(names)
        token = uuid.uuid4().hex
        if not self._write_claim(token):
            return False
        names = self.contents()
        if set(names) != {CLAIM}:  # something arrived beside our claim: not ours to build on
            self.release(token)
            raise self._refuse([n for n in names if n != CLAIM])
        self._token = token
        return True

    def _write_claim(self, token: str) -> bool:
        """Create the claim file exclusively; False when another job's claim is there first."""
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            if "file" in self.fs.protocol:
                os.makedirs(self.root, exist_ok=True)
                handle = os.open(self.claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(handle, "w") as out:
                    out.write(record)
            else:
                with self.fs.open(self.claim_path, "xb") as out:  # s3fs: a put with If-None-Match
                    out.write(record.encode())
        except FileExistsError:
            return False
        # where an exclusive create is not atomic (some object stores), the last writer wins: read it back
        return self._read_claim().get("token") == token

    def release(self, token: str | None = None) -> None:
        """Remove this job's claim (after the store's attributes are written, or on failure)."""
        token = token or self._token
        if token and self._read_claim().get("token") == token:
            self.fs.rm_file(self.claim_path)
        self._token = None

    def _read_claim(self) -> dict:
        try:
            return json.loads(self.fs.cat_file(self.claim_path))
        except (FileNotFoundError, ValueError):
            return {}

    def wait_for_store(self, ready, wait_seconds: float = CREATE_WAIT_SECONDS) -> None:
        """Wait until ``ready()`` (the store opens) while another job's claim stands; refuse anything else."""
        deadline = time.monotonic() + wait_seconds
        while not ready():
            names = self.contents()
            if CLAIM not in names:
                if ready():  # the creator wrote the attributes, then removed its claim
                    return
                raise self._refuse(names) if names else SiteError(f"{self.url}: the job creating this store "
                                                                  "gave up before finishing; run again")
            claim = self._read_claim()
            owner = f"pid {claim.get('pid')} on {claim.get('host')} since {claim.get('since')}"
            if claim.get("host") == socket.gethostname() and not _pid_alive(int(claim.get("pid", 0))):
                raise SiteError(f"{self.url}: a creation ({owner}) was interrupted and left a partial store; "
                                "remove it and run again")
            if time.monotonic() > deadline:
                raise SiteError(f"{self.url}: still being created by another job ({owner}) after {wait_seconds:.0f} s;"
                                f" if no such job runs, remove the partial store and run again")
            time.sleep(_POLL_SECONDS)
