"""`python -m mealv2` (and so `torchrun -m mealv2`) runs the command line."""

from mealv2.cli import run

run()
