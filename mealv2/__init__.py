"""mealv2: MEAL V2 distillation in two stages (cache the teacher ensemble, then train students)."""

__version__ = "0.1.0"
