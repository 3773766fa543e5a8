"""One-line errors: each command prints one line per failure, and messages quote another library's error by its gist."""

from __future__ import annotations

import re

_COLOURS = re.compile(r"\x1b\[[0-9;]*m")
_BANNERS = ("Critical error", "Current pipeline")  # the lines DALI puts before what went wrong


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of ``err`` that says something (terminal colours and DALI's banners dropped), at most ``limit``
    characters; the error's type name when it says nothing."""
    lines = [_COLOURS.sub("", line).strip() for line in str(err).splitlines()]
    return ([line for line in lines if line and not line.startswith(_BANNERS)] or [type(err).__name__])[0][:limit]
