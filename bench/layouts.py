"""Layout benchmark: the CPU paths behind engine/ops.py's `Depthwise`, `subsample` and `grad_in_layout`.

Rows, each a forward and backward (median of --reps timed runs after 3 untimed ones), batch 128 at the
optimize network's shapes (C=16, 14x14 and smaller):
    dilated-strided   the depthwise dilation-2 stride-2 conv as nn.Conv2d runs it (`direct`) against the
                      undilated stride-1 conv of the even pixels (`even-pixels`, the engine's), channels_last
    dilated-stride1   the depthwise dilation-2 stride-1 conv (`direct`, the engine's) against two exact
                      rewrites the engine does not use: a zero-inserted undilated kernel (`zero-inserted`)
                      and four polyphase convs (`polyphase`); kept to show why
    relu-backward     ReLU's backward on channels_last features, with a channels_last gradient (`same`), a
                      channel slice of one (`slice`, what a concatenation's backward gives), a contiguous
                      one (`contiguous`, what a slice's or global pooling's backward gave before `subsample`
                      and `grad_in_layout`)
    subsample         the even pixels by slicing (`slice`, a contiguous gradient) against `subsample` (a
                      channels_last gradient)

    python bench/layouts.py --json bench/results/layouts-cpu-2026-12-05.json
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (puts the repo on sys.path)
import torch
import torch.nn.functional as F

from common import median_ms, print_table, write_json
from engine.ops import subsample

CL = torch.channels_last


def fwd_bwd(make):
    def run():
        y = make()
        y.backward(torch.ones_like(y))
    return run


def zero_inserted(x, w, pad):
    c, _, k, _ = w.shape
    dense = w.new_zeros(c, 1, 2 * k - 1, 2 * k - 1)
    dense[:, :, ::2, ::2] = w
    return F.conv2d(x, dense, None, 1, pad, 1, c)


def polyphase(x, w, pad):
    n, c, h, wd = x.shape
    x = F.pad(x, (0, wd % 2, 0, h % 2))
    y = F.conv2d(F.pixel_unshuffle(x, 2).contiguous(memory_format=CL), w.repeat_interleave(4, 0), None, 1,
                 pad // 2, 1, 4 * c)
    return F.pixel_shuffle(y, 2)[:, :, :h, :wd]


def rows(reps: int, batch: int) -> list[dict]:
    out = []
    for c, size, k in ((32, 14, 3), (32, 14, 5), (64, 7, 3), (64, 7, 5)):
        x = torch.randn(batch, c, size, size).contiguous(memory_format=CL).requires_grad_()
        w = torch.randn(c, 1, k, k, requires_grad=True)
        for variant, make in (("direct", lambda: F.conv2d(x, w, None, 2, k - 1, 2, c)),
                              ("even-pixels", lambda: F.conv2d(subsample(x), w, None, 1, (k - 1) // 2, 1, c))):
            out.append({"case": "dilated-strided", "shape": f"{batch}x{c}x{size}x{size} k{k}", "variant": variant,
                        "ms": median_ms(fwd_bwd(make), reps, warmup=3)})
    for c, size, k in ((16, 14, 3), (16, 14, 5), (32, 7, 3), (32, 7, 5), (64, 4, 3), (64, 4, 5)):
        x = torch.randn(batch, c, size, size).contiguous(memory_format=CL).requires_grad_()
        w = torch.randn(c, 1, k, k, requires_grad=True)
        for variant, make in (("direct", lambda: F.conv2d(x, w, None, 1, k - 1, 2, c)),
                              ("zero-inserted", lambda: zero_inserted(x, w, k - 1)),
                              ("polyphase", lambda: polyphase(x, w, k - 1))):
            out.append({"case": "dilated-stride1", "shape": f"{batch}x{c}x{size}x{size} k{k}", "variant": variant,
                        "ms": median_ms(fwd_bwd(make), reps, warmup=3)})
    for c, size in ((64, 14), (128, 7)):
        x = torch.randn(batch, c, size, size).contiguous(memory_format=CL)
        wide = torch.randn(batch, 4 * c, size, size).contiguous(memory_format=CL)
        for variant, grad in (("same", torch.randn_like(x)), ("slice", wide[:, :c]),
                              ("contiguous", torch.randn(x.shape))):
            out.append({"case": "relu-backward", "shape": f"{batch}x{c}x{size}x{size}", "variant": variant,
                        "ms": median_ms(lambda: torch.ops.aten.threshold_backward(grad, x, 0), reps, warmup=3)})
    for c, size in ((64, 14), (128, 7)):
        x = torch.randn(batch, c, size, size).contiguous(memory_format=CL).requires_grad_()
        for variant, make in (("slice", lambda: torch.relu(x)[:, :, ::2, ::2]),
                              ("subsample", lambda: subsample(torch.relu(x)))):
            out.append({"case": "subsample+relu", "shape": f"{batch}x{c}x{size}x{size}", "variant": variant,
                        "ms": median_ms(fwd_bwd(make), reps, warmup=3)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    records = rows(args.reps, args.batch)
    for r in records:
        r["ms"] = round(r["ms"], 3)
    print_table(records, ["case", "shape", "variant", "ms"],
                title=f"forward+backward, median of {args.reps}, {torch.get_num_threads()} threads")
    write_json(args.json, records, reps=args.reps, batch=args.batch, threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
