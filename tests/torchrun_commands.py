"""Several mealv2 command lines, one after another, in each rank of one torchrun launch.

`torchrun --nproc-per-node N tests/torchrun_commands.py COMMANDS.json`: COMMANDS.json maps a name to an argument list;
each rank runs the commands in that order through the command line (click's CliRunner, as the tests' run_cli does)
and writes NAME.rank<R>.json ({"exit_code", "output"}) beside COMMANDS.json as each command ends. The ranks start
once (torch, timm and DALI imported) for every command of a test module instead of once per command, half a minute
each on 2 shared cores; a command that fails leaves the next to run.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed as dist
from click.testing import CliRunner
from torch.distributed import distributed_c10d

from mealv2.cli import main


def _fresh_group_names(offset: int) -> None:
    """Name the next process group a command creates apart from those earlier commands made and left.

    Every group lives on torchrun's one store under a name from torch's group counter, which leaving the default group
    resets to 0: a group made again would meet the keys of the one a finished command left there and wait on ranks
    that are gone (seen: the third distill of a launch never joined)."""
    if not dist.is_initialized():  # a command refused before leaving keeps its group, and the next one joins it
        assert hasattr(distributed_c10d._world, "group_count"), "torch names its groups otherwise now"
        distributed_c10d._world.group_count = offset


def run_commands(listing: Path) -> None:
    rank = os.environ["RANK"]
    for number, (name, args) in enumerate(json.loads(listing.read_text()).items()):
        _fresh_group_names(1000 * number)
        result = CliRunner().invoke(main, args)
        output = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):  # a bug, not a refusal
            output += "".join(traceback.format_exception(result.exception))
        record = {"exit_code": result.exit_code, "output": output}
        (listing.parent / f"{name}.rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run_commands(Path(sys.argv[1]))
