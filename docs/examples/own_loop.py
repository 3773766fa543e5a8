"""Distil a student from a mealv2 label store with a plain PyTorch loop (docs/api.md).

    python docs/examples/own_loop.py --data ROOT --store labels.zarr --model resnet18 --epochs 2
"""

import argparse

import timm
import torch
from timm.data import resolve_data_config
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

import mealv2


def main():
    parser = argparse.ArgumentParser()
    for flag, default in [("--data", None), ("--store", None), ("--model", "resnet18"), ("--epochs", 2),
                          ("--batch-size", 64), ("--lr", 0.01), ("--workers", 4)]:
        parser.add_argument(flag, default=default, type=type(default) if default is not None else str,
                            required=default is None)
    args = parser.parse_args()

    store = mealv2.open_store(args.store)
    dataset = mealv2.ReplayDataset(args.data, store)  # item: (uint8 crop, dense soft target, row)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=True, drop_last=True)
    model = timm.create_model(args.model, num_classes=store.num_classes)
    config = resolve_data_config({}, model=model)  # normalisation is the model's own
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(config["std"]).view(1, 3, 1, 1) * 255
    optimizer = create_optimizer_v2(model, "sgd", lr=args.lr, momentum=0.9, weight_decay=0.0)

    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)  # epoch e replays the crops and labels of seed slot e mod store.num_slots
        model.train()
        for images, targets, _ in loader:
            logits = model((images.float() - mean) / std)
            loss = mealv2.soft_cross_entropy(logits, targets)  # -sum_c p_c log softmax(z)_c, batch mean
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}/{args.epochs}: soft cross-entropy {loss.item():.4f}")


if __name__ == "__main__":  # DataLoader and DALI workers may import this script again
    main()
