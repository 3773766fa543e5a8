"""Where a label store is to be created: refuse to touch anything there, and let one job of many create it, and
one at a time change its metadata.

A new store is made only where nothing is (or in an empty folder). Jobs that start at
once (``--shard`` jobs from a scheduler) race for a claim (mealv2.pipeline.claim); the
winner creates the store, the others wait until it opens. A claim left behind by a
creation that was killed (locally: a claim file nobody holds locked; on object storage:
past its lease) or that failed (an interrupt, a full disk) marks a creation to resume: one
job takes it over and creates the store again over that partial store's files, which only
a creation can have written.

Jobs sharing a store change its attributes and the shapes of its arrays (seed slots added) in
turn, each holding the store's second claim (``changing``) while it reads what the others
wrote and writes its change: none writes back what it read before another's change.
"""

from __future__ import annotations

import time
from typing import Callable

import fsspec

from mealv2.pipeline.claim import Claim

CLAIM = ".mealv2-creating"  # inside the store's folder while one job creates it
CHANGING = ".mealv2-changing"  # inside the store while one job changes its attributes or its arrays' shapes
CREATE_WAIT_SECONDS = 300.0  # writing a new store's metadata and index takes seconds, even on a bucket
_POLL_SECONDS = 0.2


class SiteError(ValueError):
    """The location cannot take a new store: the message names it and what is there."""


class StoreSite:
    """The folder or prefix of a store that may not exist yet."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.claim = Claim(self.fs, f"{self.root}/{CLAIM}")
        self.changing = Claim(self.fs, f"{self.root}/{CHANGING}")

    def create_once(self, ready: Callable[[], bool], create: Callable[[], object],
                    wait_seconds: float = CREATE_WAIT_SECONDS) -> bool:
        """Call ``create()`` if this job wins the creation (True), else wait until ``ready()`` (False).

        Refuses, touching nothing, a location that holds anything but a store or a creation. A
        failed ``create()`` keeps its claim, marked given up, so that a rerun resumes the creation.
        """
        deadline = time.monotonic() + wait_seconds
        while not ready():
            try:
                claimed = self._claim()
            except SiteError:
                if ready():  # the creator finished between the two looks
                    return False
                raise
            if claimed:
                try:
                    create()
                except BaseException:  # Ctrl-C and a full disk too: the partial store is this claim's to resume
                    self.claim.abandon()
                    raise
                self.claim.release()
                return True
            if time.monotonic() > deadline:
                raise SiteError(f"{self.url}: still being created by another job ({self.claim.owner()}) after "
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

    def _claim(self) -> bool:
        """Whether this job now owns the creation (False while another job's creation stands)."""
        names = self.contents()
        if names and CLAIM not in names:
            raise self._refuse(names)
        return self.claim.take()
