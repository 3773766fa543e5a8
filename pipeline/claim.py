"""An exclusive claim on a place (a store being created, a run's folder): one holder at a time, a dead one replaced.

The claim is a small JSON file made with an exclusive create (O_EXCL on a filesystem, a
conditional put on S3) that names its holder. A claim whose holder is known to be gone (the
same machine and no such pid), or whose holder gave up (``abandon``: its work failed and is
to be resumed), is taken over by one job alone (a second exclusive create decides which).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from mealv2.pipeline.files import atomic_write, pid_alive

_ABANDONED: set[str] = set()  # tokens this process gave up, even where marking the file failed (a full disk)


class Claim:
    """The claim file at ``path`` on the fsspec filesystem ``fs``."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.local = "file" in fs.protocol

    def take(self) -> str | None:
        """This job's token if it now holds the claim (taking over an abandoned one); None while another holds it."""
        held = self.holder()
        if held:
            if not self._abandoned(held) or not self._exclusive_create(f"{self.path}.takeover-{held['token']}"):
                return None
            self.fs.rm_file(self.path)  # one job alone gets here for this claim
            self.fs.rm_file(f"{self.path}.takeover-{held['token']}")
        token = uuid.uuid4().hex
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        if not self._exclusive_create(self.path, json.dumps(record).encode()):
            return None
        # where an exclusive create is not atomic (some object stores), the last writer wins: read it back
        return token if self.holder().get("token") == token else None

    def release(self, token: str) -> None:
        """Remove the claim if ``token`` still holds it: the work is done."""
        if self.holder().get("token") == token:
            self.fs.rm_file(self.path)

    def abandon(self, token: str) -> None:
        """Keep the claim but mark it given up, so that the next job takes it over and resumes the work."""
        _ABANDONED.add(token)
        held = self.holder()
        if held.get("token") != token:
            return
        data = json.dumps({**held, "abandoned": True}).encode()
        try:  # replaced whole or not at all: a torn claim would block the place
            if self.local:
                atomic_write(self.path, lambda tmp: tmp.write_bytes(data))
            else:
                self.fs.pipe_file(self.path, data)
        except OSError:
            pass  # a full disk: this process remembers, and once it exits its pid is gone

    def holder(self) -> dict:
        """The holder's record ({} when nobody holds the claim)."""
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return {}

    def owner(self) -> str:
        held = self.holder()
        return f"pid {held.get('pid')} on {held.get('host')} since {held.get('since')}"

    @staticmethod
    def _abandoned(held: dict) -> bool:
        """A claim given up, or whose process is known to be gone: made here by a pid that no longer runs."""
        if not held.get("token"):
            return False
        return held["token"] in _ABANDONED or bool(held.get("abandoned")) or (
            held.get("host") == socket.gethostname() and not pid_alive(int(held.get("pid", 0))))

    def _exclusive_create(self, path: str, data: bytes = b"") -> bool:
        """Create ``path`` holding ``data`` unless it exists (False then)."""
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    with os.fdopen(fd, "wb") as out:
                        out.write(data)
                except OSError:  # a full disk: an empty claim would name no holder and block the place
                    os.remove(path)
                    raise
            else:
                with self.fs.open(path, "xb") as out:  # s3fs: a put with If-None-Match
                    out.write(data)
        except FileExistsError:
            return False
        return True
