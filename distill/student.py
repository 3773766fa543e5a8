"""The student: a timm model by name, initialised from hub weights (default), from scratch, or a local file."""

from __future__ import annotations

import timm
from torch import nn

from softlabels.teachers import TeacherError, create_model


def create_student(name: str, num_classes: int, init: str = "pretrained") -> nn.Module:
    """``init``: "pretrained" (the paper finds a good initialisation critical), "scratch", or a weights PATH.

    With hub weights for another number of classes, timm keeps the backbone and starts a new head.
    """
    if init == "scratch":
        return create_model(name, num_classes)
    if init != "pretrained":
        return create_model(name, num_classes, checkpoint=init)
    if not timm.is_model(name.split(".")[0]):
        raise TeacherError(f"{name}: not a timm model name")
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as err:  # noqa: BLE001 - hub and network failures alike
        raise TeacherError(f"{name}: cannot load pretrained weights ({str(err).splitlines()[0]}); "
                           "use --init scratch or --init PATH") from None
