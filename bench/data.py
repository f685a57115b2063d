"""Loader throughput: images/s of one training epoch (augmented, float NCHW on the device) for
    dali      the engine's feeding path (DALI pipeline; CPU without a GPU, GPU with one)
    torch     torch.utils.data.DataLoader with per-sample augmentation, num_workers 0 and 2 (the baseline)
    tensor    the split resident on the device as uint8, augmented there in batch
at batch 64 and 256. Every loader plays the same samples with the same crops and flips (EpochPlan).
One untimed warm-up pass builds pipelines / starts workers; the timed pass is a full epoch.

Then the data wait per step: the fashion-mnist preset's warmup weight steps (its fastest steps, so the share
a loader costs shows most) fed by each loader, the time spent in `next(batch)` timed apart from the step's
(on CUDA after a synchronize, so the wait is not hidden behind queued work). DALI prepares the next batch
while a step runs, so its wait is what is left over.

    python bench/data.py --dataset fashion-mnist --json bench/results/data.json
"""
from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (puts the repo on sys.path)
import torch

from engine.build import build_run
from engine.config import preset
from engine.data import load_dataset, make_loader, train_augment
from engine.errors import AsoseError


def measure(kind: str, images, labels, batch_size: int, device, augment, num_workers: int = 0,
            max_batches: int | None = None) -> float:
    loader = make_loader(kind, images, labels, batch_size, train=True, augment=augment, device=device,
                         num_workers=num_workers, max_batches=max_batches)
    for i, _ in enumerate(loader):  # warm-up: builds the pipeline, spawns workers, touches memory
        if i == 3:
            break
    n = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, y in loader:
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def data_wait(kind: str, device, steps: int, warmup: int = 3) -> dict:
    """ms per step spent waiting for the next batch and ms in the weight step itself, over `steps` steps."""
    run = build_run(preset("fashion-mnist").override([f"loader={kind}", f"device={device.type}"]))
    weight_step = run.supernet.steps.weight_step
    data = iter(run.loaders["train"])
    wait = work = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = next(data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        weight_step(x, y, "warmup")
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            wait, work = wait + t1 - t0, work + time.perf_counter() - t1
    return {"loader": kind, "device": device.type, "batch_size": run.cfg.batch_size, "steps": steps,
            "data_wait_ms": round(1e3 * wait / steps, 2), "step_ms": round(1e3 * work / steps, 2),
            "wait_share": round(wait / (wait + work), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--max-batches", type=int, default=None, help="cap the timed epoch (default: full epoch)")
    p.add_argument("--wait-steps", type=int, default=40, help="weight steps per loader for the data wait (0: skip)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        ds = load_dataset(args.dataset, args.data_dir)
    except AsoseError as e:
        raise SystemExit(f"bench/data.py: {e}")
    augment = train_augment(ds)
    images, labels = ds.train_images, ds.train_labels
    records = []
    variants = [("dali", 0), ("torch", 0), ("torch", 2), ("tensor", 0)]
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        for kind, workers in variants:
            ips = measure(kind, images, labels, bs, device, augment, workers, args.max_batches)
            rec = {"loader": kind, "num_workers": workers if kind == "torch" else None, "device": device.type,
                   "batch_size": bs, "images_per_s": round(ips, 1), "dataset": ds.name, "samples": len(labels)}
            records.append(rec)
            print(f"  {kind:<6} workers={workers} batch={bs:<4} {ips:>10,.0f} images/s", flush=True)
    base = {r["batch_size"]: r["images_per_s"] for r in records if r["loader"] == "torch" and r["num_workers"] == 0}
    for r in records:
        r["vs_torch_w0"] = round(r["images_per_s"] / base[r["batch_size"]], 2)
    common.print_table(records, ["loader", "num_workers", "device", "batch_size", "images_per_s", "vs_torch_w0"],
                       title=f"\nloader throughput, {ds.name} train set ({len(labels)} images), one epoch, augmented")
    waits = [data_wait(kind, device, args.wait_steps) for kind in ("dali", "torch", "tensor")] if args.wait_steps else []
    if waits:
        common.print_table(waits, ["loader", "device", "batch_size", "steps", "data_wait_ms", "step_ms", "wait_share"],
                           title="\ndata wait per step: the fashion-mnist preset's warmup weight steps")
    common.write_json(args.json, records, bench="data", dataset=ds.name, data_wait=waits)


if __name__ == "__main__":
    main()
