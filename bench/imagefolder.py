"""Your own images, measured: write Fashion-MNIST as an ImageFolder directory, and time DALI's decoding of it
against torchvision's.

    python bench/imagefolder.py --write /tmp/fm-png --format png              # all 70,000 images as PNG files
    python bench/imagefolder.py --write /tmp/fm-jpg --format jpg --limit 12000
    python bench/imagefolder.py --write /tmp/fm-jpg256 --format jpg --limit 1800 --side 256   # larger colour files
    python bench/imagefolder.py --decode /tmp/fm-png --decode /tmp/fm-jpg --json bench/results/decode.json

`--write` names each file by its index in the idx file and each class folder `<label>_<name>`, so the folder's
classes sort in label order and its files in idx order: read back (`--set dataset=imagefolder`) the arrays
equal the idx files' bit for bit (PNG; JPEG is lossy). `--decode` times, on one thread, the engine's DALI CPU
decoding of every file (engine/data/imagefolder.py: batches of 256 fed from memory) against torchvision's
`decode_image` one file at a time, after reading all files into memory once, so both time decoding alone;
best of `--repeats`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import print_table, write_json  # (puts the project on sys.path)
import numpy as np
import torch

from engine.data import load_dataset
from engine.data.decode import Decoder
from engine.data.imagefolder import scan


def write_fashion_mnist(out: str, fmt: str, limit: int | None, side: int = 28) -> int:
    from PIL import Image
    d = load_dataset("fashion-mnist")
    names = [f"{k}_{c.replace('/', '_').replace(' ', '_')}" for k, c in enumerate(d.classes)]
    n = 0
    for split, images, labels in (("train", d.train_images, d.train_labels), ("test", d.test_images, d.test_labels)):
        count = len(labels) if limit is None else min(len(labels), limit if split == "train" else limit // 6)
        for name in names:
            os.makedirs(os.path.join(out, split, name), exist_ok=True)
        for i in range(count):
            path = os.path.join(out, split, names[labels[i]], f"{i:05d}.{fmt}")
            img = Image.fromarray(images[i, :, :, 0])
            if side != 28:  # larger files: the image scaled up, in colour (a tint per class)
                tint = np.array([1.0, 0.6 + 0.04 * labels[i], 1.0 - 0.05 * labels[i]])
                img = Image.fromarray((np.asarray(img.resize((side, side), Image.BILINEAR))[..., None]
                                       * tint).astype(np.uint8))
            img.save(path, **({"quality": 95} if fmt == "jpg" else {}))
        n += count
    return n


def time_decoders(folder: str, repeats: int) -> dict:
    from torchvision.io import decode_image
    _, splits = scan(folder)
    files = [f for name in sorted(splits) for f, _ in splits[name]]
    blobs = [np.fromfile(f, dtype=np.uint8) for f in files]
    ext = os.path.splitext(files[0])[1].lstrip(".")
    size = min(np.array(decode_image(torch.from_numpy(blobs[0]))).shape[1:])
    torch.set_num_threads(1)
    dali = Decoder(size, "cpu")
    best = {"dali": float("inf"), "torchvision": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        for s in range(0, len(blobs), 256):
            dali.decode(blobs[s:s + 256])
        best["dali"] = min(best["dali"], time.perf_counter() - t)
        t = time.perf_counter()
        for b in blobs:
            decode_image(torch.from_numpy(b))
        best["torchvision"] = min(best["torchvision"], time.perf_counter() - t)
    return {"folder": folder, "format": ext, "images": len(files), "side": int(size),
            "dali_img_s": len(files) / best["dali"], "torchvision_img_s": len(files) / best["torchvision"],
            "dali_over_torchvision": best["torchvision"] / best["dali"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", default=None, metavar="DIR", help="write Fashion-MNIST as an ImageFolder directory")
    p.add_argument("--format", default="png", choices=("png", "jpg"))
    p.add_argument("--limit", type=int, default=None, help="training images to write (test: a sixth of it)")
    p.add_argument("--side", type=int, default=28, help="write the images scaled to SIDE x SIDE, in colour")
    p.add_argument("--decode", action="append", default=[], metavar="DIR", help="time the decoders on DIR")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.write:
        t = time.perf_counter()
        n = write_fashion_mnist(args.write, args.format, args.limit, args.side)
        print(f"wrote {n:,} {args.format} files under {args.write} in {time.perf_counter() - t:.1f} s")
    if args.decode:
        rows = [time_decoders(folder, args.repeats) for folder in args.decode]
        print_table(rows, ["format", "images", "side", "dali_img_s", "torchvision_img_s", "dali_over_torchvision"],
                    title="decoding, one thread, files in memory (best of %d)" % args.repeats)
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
