"""mealv2: MEAL V2 distillation in two stages (cache the teacher ensemble, then train students).

The public API for your own training loop (docs/api.md)::

    store = mealv2.open_store("labels.zarr")          # read-only, any fsspec URL
    ds = mealv2.ReplayDataset("data", store)          # item: (uint8 crop, dense target, row)
    ds.set_epoch(epoch)                               # epoch e replays seed slot e mod store.num_slots

Names are imported on first use, so that the command line starts without torch.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "open_store": "mealv2.softlabels.store",
    "LabelStore": "mealv2.softlabels.store",
    "StoreError": "mealv2.softlabels.schema",
    "ReplayDataset": "mealv2.distill.replay_dataset",
    "StoreLoader": "mealv2.distill.replay_dataset",
    "soft_cross_entropy": "mealv2.distill.losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mealv2' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(list(globals()) + __all__)
