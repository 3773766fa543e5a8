"""The `mealv2` command line: wiring from options to the library, no logic of its own."""

from __future__ import annotations

import click

from mealv2 import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mealv2")
def main():
    """MEAL V2 distillation: cache a teacher ensemble's soft labels once, train many students from them."""


def _not_built(name: str, issue: int):
    @main.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                  help=f"(not built yet: issue {issue})")
    def command():
        raise click.ClickException(f"`mealv2 {name}` is not built yet (issue {issue})")
    return command


for _name, _issue in [("cache-teachers", 3), ("labels", 3), ("distill", 4), ("train", 4), ("evaluate", 4),
                      ("data", 5), ("demo", 5)]:
    _not_built(_name, _issue)
