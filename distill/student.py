"""The student: a timm model by name, initialised from hub weights (default), from scratch, or a local file."""

from __future__ import annotations

import timm
from timm.layers import convert_sync_batchnorm
from torch import nn

from mealv2.softlabels.models import ModelError, create_model


def create_student(name: str, num_classes: int, init: str = "pretrained", **timm_kwargs) -> nn.Module:
    """``init``: "pretrained" (the paper finds a good initialisation critical), "scratch", or a weights PATH.

    With hub weights for another number of classes, timm keeps the backbone and starts a new head.
    ``timm_kwargs`` go to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``).
    """
    if init == "scratch":
        return create_model(name, num_classes, **timm_kwargs)
    if init != "pretrained":
        return create_model(name, num_classes, checkpoint=init, **timm_kwargs)
    if not timm.is_model(name.split(".")[0]):
        raise ModelError(f"{name}: not a timm model name")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **timm_kwargs)
    except Exception as err:  # noqa: BLE001 - hub and network failures alike
        raise ModelError(f"{name}: cannot load pretrained weights ({str(err).splitlines()[0]}); "
                         "use --init scratch or --init PATH") from None


def synchronize_batchnorm(model: nn.Module) -> nn.Module:
    """Batch norm whose statistics are reduced over ranks (--sync-bn), keeping timm's fused activations.

    torch's own ``SyncBatchNorm.convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` into a
    plain SyncBatchNorm and drops its activation: a MobileNetV3 then computes another function.
    timm's conversion keeps norm and activation together (``SyncBatchNormAct``).
    """
    return convert_sync_batchnorm(model)
