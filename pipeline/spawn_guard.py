"""The spawn trap: a script that builds a DALI loader at import time, without the ``__main__`` guard.

DALI starts its Python workers with multiprocessing's "spawn", and every spawned process
begins by importing the parent's main script again; a script that trains at its top level
would then train once more in each worker. ``check_main_is_guarded`` refuses that before
any worker starts, naming the script's line and what to add.
"""

from __future__ import annotations

import ast
import multiprocessing
import sys
from functools import lru_cache

GUARD = 'if __name__ == "__main__":'


class SpawnTrap(RuntimeError):
    """A loader that starts worker processes was built by code that those workers would run again."""


@lru_cache(maxsize=8)
def _guarded_lines(path: str) -> tuple[tuple[int, int], ...]:
    """(first, last) line of each top-level ``if __name__ == "__main__":`` body in the script at ``path``."""
    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
    except (OSError, SyntaxError, ValueError):
        return ((0, sys.maxsize),)  # a script we cannot read is not judged
    spans = []
    for node in tree.body:
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
                and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
                and test.comparators[0].value == "__main__"):
            spans.append((node.body[0].lineno, node.end_lineno))
    return tuple(spans)


def _main_line() -> tuple[str, int] | None:
    """(script, line) of the main script's top-level statement now running, when a spawned worker would re-run it."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if path is None or (spec is not None and spec.name.endswith("__main__")):
        return None  # interactive, or ``python -m pkg``: spawn does not run that main again
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>":
            return path, frame.f_lineno
        frame = frame.f_back
    return None


def check_main_is_guarded(what: str) -> None:
    """Raise SpawnTrap if ``what`` (a loader with spawned workers) is built by unguarded top-level script code."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # a worker importing the script again
        raise SpawnTrap(f"{what} built while a worker process imports the main script; put the script's code under "
                        f"`{GUARD}`")
    running = _main_line()
    if running is None:
        return
    path, line = running
    if not any(first <= line <= last for first, last in _guarded_lines(path)):
        raise SpawnTrap(f"{path}:{line}: builds {what} at import time; its worker processes import the script again "
                        f"and would run it again: put that code under `{GUARD}`")
