"""The optimisation recipe of a run from timm's own factories: optimizer, lr schedule, weight EMA, gradient clip.

The defaults are the paper's (SGD with momentum 0.9, no weight decay, lr ×0.1 at epoch 100);
``--opt adamw --sched cosine --warmup-epochs 5 --model-ema`` is the timm way, from the same store.
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import nn

from mealv2.distill.config import TrainConfig

# `step` keeps the official code's rule: lr × decay-rate once each listed epoch is done (torch's MultiStepLR).
# timm's MultiStepLRScheduler decays once t + 1 reaches a milestone (timm/scheduler/multistep_lr.py), so it
# gets every epoch of --lr-steps plus one.
_MILESTONE_SCHEDULES = ("step", "multistep")


def create_optimizer(config: TrainConfig, student: nn.Module, discriminator: nn.Module | None) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` over the student and the discriminator (its own lr, by default the student's).

    Weight decay, when asked for, skips biases and norms as timm's train.py does.
    """
    groups = param_groups_weight_decay(student, config.weight_decay)
    if discriminator is not None:
        for group in param_groups_weight_decay(discriminator, config.weight_decay):
            groups.append(group | {"lr": config.d_lr or config.lr})
    extra = {"eps": config.opt_eps} if config.opt_eps is not None else {}
    return create_optimizer_v2(groups, config.opt, lr=config.lr, weight_decay=config.weight_decay,
                               momentum=config.momentum, **extra)


def create_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """timm's ``create_scheduler_v2``, stepped once per epoch with the number of epochs done."""
    milestones = [epoch + 1 for epoch in config.lr_steps] if config.sched in _MILESTONE_SCHEDULES else ()
    scheduler, _ = create_scheduler_v2(
        optimizer, "multistep" if milestones else config.sched, num_epochs=config.epochs,
        decay_milestones=milestones, decay_rate=config.decay_rate, min_lr=config.min_lr,
        warmup_lr=config.warmup_lr, warmup_epochs=config.warmup_epochs)
    return scheduler


def create_ema(config: TrainConfig, student: nn.Module) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of the student's weights (--model-ema), or None."""
    return ModelEmaV3(student, decay=config.model_ema_decay) if config.model_ema else None


def clip_gradients(config: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
    """timm's ``dispatch_clip_grad`` over every trained parameter (--clip-grad, --clip-mode); no-op when unset."""
    if config.clip_grad is None:
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    dispatch_clip_grad(parameters, config.clip_grad, mode=config.clip_mode)
