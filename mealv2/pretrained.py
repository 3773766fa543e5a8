"""The demo's pretrained teachers: float16 weights shipped in the package, pinned by sha256, with the command
that made them.

`mealv2 demo` starts from them as a team starts from downloaded giants; `mealv2 demo --train-teachers`
trains them again with the recorded settings and writes a folder of the same form.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST = "teachers.json"
SHIPPED = Path(__file__).parent / "teachers"  # the package's pinned teachers and their manifest


@dataclass(frozen=True)
class PinnedTeacher:
    """One teacher's weights file, its checksum, its accuracy as stored and the command that trained it."""

    model: str
    file: str  # beside the manifest
    sha256: str
    top1: float  # on Fashion-MNIST's 10,000 test images, with the stored (float16) weights
    command: tuple[str, ...]  # the `mealv2 train` arguments that trained it

    def __post_init__(self):
        object.__setattr__(self, "command", tuple(self.command))


def read_manifest(folder: str | Path) -> list[PinnedTeacher]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teachers manifest (write one with `mealv2 demo --train-teachers`)")
    try:
        return [PinnedTeacher(**entry) for entry in json.loads(path.read_text())["teachers"]]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: expected {{'teachers': [{{model, file, sha256, top1, command}}]}} ({err})") from None


def write_manifest(folder: str | Path, teachers: list[PinnedTeacher]) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps({"teachers": [asdict(t) for t in teachers]}, indent=2) + "\n")
    return path


def verified_spec(folder: str | Path) -> tuple[list[PinnedTeacher], str]:
    """The manifest's teachers and their `--teachers NAME=PATH,...` spec, each file checked against its sha256."""
    from mealv2.pipeline.models import file_sha256

    teachers = read_manifest(folder)
    for teacher in teachers:
        path = Path(folder) / teacher.file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: teacher weights missing (listed in {MANIFEST})")
        if file_sha256(path) != teacher.sha256:
            raise ValueError(f"{path}: sha256 differs from {MANIFEST}'s {teacher.sha256[:12]}…; the file is damaged "
                             "or was replaced (re-create it with `mealv2 demo --train-teachers`)")
    return teachers, teachers_spec(folder, teachers)


def teachers_spec(folder: str | Path, teachers: list[PinnedTeacher]) -> str:
    """The `--teachers NAME=PATH,...` value for ``teachers`` stored in ``folder``."""
    return ",".join(f"{t.model}={Path(folder) / t.file}" for t in teachers)


def export_float16(checkpoint: str | Path, dest: str | Path) -> str:
    """Write ``checkpoint``'s weights to ``dest`` with float tensors as float16 (half the bytes); returns its sha256."""
    from safetensors.torch import save_file

    from mealv2.pipeline.models import file_sha256, load_state_dict

    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_state_dict(checkpoint).items()},
              str(dest))
    return file_sha256(dest)
