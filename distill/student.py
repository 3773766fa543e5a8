"""The student: a timm model by name, initialised from hub weights (default), from scratch, or a local file."""

from __future__ import annotations

from timm.layers import convert_sync_batchnorm
from torch import nn

from mealv2.pipeline.models import ModelError, create_model, hub_model, load_state_dict


def create_student(name: str, num_classes: int, init: str = "pretrained", log=print, **timm_kwargs) -> nn.Module:
    """``init``: "pretrained" (the paper finds a good initialisation critical), "scratch", or a weights PATH.

    With weights (hub or local) for another number of classes the backbone is kept and the head starts
    new, as timm's ``--pretrained`` and ``--pretrained-path`` do; for a local file ``log`` says so.
    ``timm_kwargs`` go to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``).
    """
    if init == "scratch":
        return create_model(name, num_classes, **timm_kwargs)
    if init != "pretrained":
        return _from_file(name, num_classes, init, log, **timm_kwargs)
    return hub_model(name, "give a weights file with --pretrained-path FILE (or --init scratch)",
                     num_classes=num_classes, **timm_kwargs)


def _from_file(name: str, num_classes: int, path: str, log, **timm_kwargs) -> nn.Module:
    """A student with the backbone of a local weights file; the head is new when its class count differs."""
    model = create_model(name, num_classes, **timm_kwargs)
    state = load_state_dict(path)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = [heads] if isinstance(heads, str) else list(heads)
    stored = {head: state[f"{head}.weight"].shape[0] for head in heads if f"{head}.weight" in state}
    replaced = [head for head, classes in stored.items() if classes != num_classes]
    for head in replaced:
        state = {key: value for key, value in state.items() if not key.startswith(f"{head}.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape
        raise ModelError(f"{path}: does not fit {name} ({str(err).splitlines()[1].strip()[:200]}); "
                         f"give weights of a {name}") from None
    misfit = [key for key in missing if not any(key.startswith(f"{head}.") for head in replaced)] + unexpected
    if misfit:
        raise ModelError(f"{path}: does not fit {name} (first key that differs: {misfit[0]}); "
                         f"give weights of a {name}")
    if replaced:
        log(f"--init {path}: its head has {stored[replaced[0]]} classes, the data {num_classes}: "
            "the backbone is loaded and the classifier starts new")
    return model


def synchronize_batchnorm(model: nn.Module) -> nn.Module:
    """Batch norm whose statistics are reduced over ranks (--sync-bn), keeping timm's fused activations.

    torch's own ``SyncBatchNorm.convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` into a
    plain SyncBatchNorm and drops its activation: a MobileNetV3 then computes another function.
    timm's conversion keeps norm and activation together (``SyncBatchNormAct``).
    """
    return convert_sync_batchnorm(model)
