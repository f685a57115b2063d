"""The exported model against the engine, per format and ONNX opset: export time, max |diff| of the logits on 256
test images, test accuracy, and inference throughput of the file (batch 256, this machine's threads).

    python bench/export.py --run runs/fashion-mnist --json bench/results/export.json

ONNX is written by torch.onnx.export(dynamo=True) (the path PyTorch recommends for torch 2.14) and run by
onnxruntime on the CPU; an opset the exporter cannot write is reported as such.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from common import print_table, write_json  # the project root on sys.path

from engine import export  # noqa: E402


def measure(run_dir: str, fmt: str, opset: int | None, work: str, x) -> dict:
    """One format (and opset); `x`: the test images the file's throughput is timed on."""
    row = {"format": fmt, "opset": opset if fmt == "onnx" else "-"}
    path = os.path.join(work, f"model-{fmt}-{opset}.{'pt' if fmt == 'torchscript' else 'onnx'}")
    t0 = time.perf_counter()
    try:
        result = export.export_run(run_dir, fmt, path, **({} if opset is None else {"opset": opset}))
    except Exception as e:  # noqa: BLE001 - an opset the exporter rejects is a result
        return {**row, "error": str(e).splitlines()[0][:120]}
    row["export_s"] = round(time.perf_counter() - t0, 1)  # includes the check (test accuracy over the split)
    row.update(max_abs_diff=f"{result['max_abs_diff']:.2e}", test_acc=result["test_acc"],
               run_test_acc=result["run_test_acc"], file_kb=round(os.path.getsize(path) / 1024))
    run = export.runner(path, fmt)
    run(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 3.0:
        run(x)
        n += len(x)
    row["img_s"] = round(n / (time.perf_counter() - t0))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--opsets", default="17,18,20,23")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg, net, dataset, _ = export.load_trained(args.run)
    x, _ = export.engine_logits(cfg, net, dataset, 256)
    with tempfile.TemporaryDirectory() as work:
        rows = [measure(args.run, "torchscript", None, work, x)]
        rows += [measure(args.run, "onnx", int(o), work, x) for o in args.opsets.split(",")]
    cols = ["format", "opset", "export_s", "max_abs_diff", "test_acc", "run_test_acc", "file_kb", "img_s", "error"]
    print_table(rows, cols, title=f"export of {args.run}")
    if args.json:
        write_json(args.json, rows, args=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
