"""What a user would build by hand instead of searching: a plain 5-conv CNN in eager PyTorch, trained on the
same data pipeline as the main job. The bar the main job (`make run`) has to clear.

    python bench/handmade_cnn.py --epochs 4 --json bench/results/handmade_cnn-4ep.json
    python bench/handmade_cnn.py --epochs 12 --json bench/results/handmade_cnn-12ep.json   # the main job's time

The network (278,890 parameters): conv3x3 1->32, 32->64, maxpool, 64->64, 64->128, maxpool, 128->128, each
conv followed by BatchNorm and ReLU, global average pool, linear 128->10. The recipe, as a practitioner would
pick it: SGD (momentum 0.9, nesterov, weight decay 5e-4) with a one-cycle learning rate (peak 0.1), random crop
with 2 px padding and horizontal flip, label smoothing 0.1, batch 128, channels_last on the CPU. Prints the
test accuracy after every epoch and the wall time (training and evaluation) so far.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from common import print_table, write_json

from engine.config import preset
from engine.data import make_loader, make_splits, train_augment
from engine.build import load_data
from engine.network import count_parameters


def handmade_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2),
                         *block(64, 64), *block(64, 128), nn.MaxPool2d(2),
                         *block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


@torch.no_grad()
def test_accuracy(net: nn.Module, loader) -> float:
    net.eval()
    correct = count = 0
    for x, y in loader:
        correct += int((net(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum())
        count += len(y)
    net.train()
    return correct / count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="one-cycle peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=0,
                   help="train on this many images of the official training set, the subset the engine's "
                        "train_subset draws for --seed (e.g. bench/search_quality.py's recipe with --train-set "
                        "train_subset=N); 0: all")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = preset("fashion-mnist").override([f"train_subset={args.train_subset}", f"seed={args.seed}"])
    dataset = load_data(cfg)
    splits = make_splits(dataset, 0.0, args.seed)  # the whole official training set, as the main job's optimize
    augment = train_augment(dataset, flip=True, pad=2)
    train = make_loader("dali", *splits["train"], args.batch_size, train=True, augment=augment, seed=args.seed,
                        drop_last=True)
    test = make_loader("dali", *splits["test"], 256, train=False, augment=augment, seed=args.seed)
    net = handmade_cnn(dataset.image_shape[0], dataset.num_classes).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(train))
    rows, t0 = [], time.perf_counter()
    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        for x, y in train:
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = test_accuracy(net, test)
        rows.append({"epoch": epoch + 1, "test_acc": 100 * acc, "wall_s": time.perf_counter() - t0,
                     "params": count_parameters(net)})
        print(f"epoch {epoch + 1}/{args.epochs}  test {100 * acc:.2f}%  {rows[-1]['wall_s']:.0f}s", flush=True)
    print_table(rows, ["epoch", "test_acc", "wall_s", "params"], title="hand-made CNN, Fashion-MNIST")
    write_json(args.json, rows, recipe=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
