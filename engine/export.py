"""`aso-se export RUN [--format torchscript|onnx] [--out FILE]`: the derived, trained network as a file that
loads without ASO-SE.

The exported model takes what torchvision's `ToTensor` gives: float32 images (N, C, H, W) with values in
[0, 1], any batch size. The data pipeline's normalization (per-channel mean and std, 0-255 units) is folded into
the model, and so is the test-time augmentation the run tested with (`test_flip`: the mean of the logits of each
image and its mirror), so the file's test accuracy is the run's. It returns the logits (N, classes). The file
carries the same facts as metadata (TorchScript: the extra file `aso-se.json`; ONNX: `metadata_props`).

    torch.jit.load("model.pt")(x)                                       TorchScript (torch.jit.trace)
    onnxruntime.InferenceSession("model.onnx").run(None, {"images": x})  ONNX (torch.onnx.export, dynamo=True)

After writing, the file is loaded back (TorchScript with torch.jit.load, ONNX with onnxruntime) and checked
against the engine: the largest difference of the logits on the first 256 test images, and the accuracy on the
whole test split, which must equal final.json's.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn

from .genotype import Genotype
from .build import load_data
from .checkpoint import final_spec, load_checkpoint
from .config import Config
from .data import make_loader, make_splits, train_augment
from .errors import CheckpointError, ConfigError
from .network import Network

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18   # chosen by measurement: README "Export"


class Standalone(nn.Module):
    """The derived network with the data pipeline's normalization and the test-time flip folded in."""

    def __init__(self, net: nn.Module, mean, std, flip: bool):
        super().__init__()
        self.net, self.flip = net, flip
        self.register_buffer("scale", 255.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
                             / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale - self.shift   # (255 x - mean) / std
        out = self.net(x)
        if self.flip:
            out = 0.5 * (out + self.net(x.flip(-1)))
        return out


def _finished_checkpoint(run_dir: str) -> str:
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: no such run directory")
    if not os.path.isfile(os.path.join(run_dir, "final.json")):
        raise CheckpointError(f"{run_dir}: unfinished run (no final.json): export needs the trained network; "
                              f"finish it with aso-se search --resume {run_dir}")
    for name in ("optimize.pt", "last.pt"):
        path = os.path.join(run_dir, "checkpoints", name)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"{run_dir}/checkpoints: no optimize.pt or last.pt: the run's checkpoints are gone")


def load_trained(run_dir: str):
    """(config, the derived network in eval mode on the CPU, the data set, final.json) of a finished run."""
    path = _finished_checkpoint(run_dir)
    state = load_checkpoint(path)
    if state.get("final_net") is None:
        raise CheckpointError(f"{path}: holds no trained derived network (the run had no optimize phase); "
                              f"train one with aso-se train --genotype {run_dir}/genotype.json")
    cfg = Config.from_json(state["config"], path)
    try:
        net = Network(final_spec(state, cfg), Genotype.from_json(state["final_genotype"], path))
        net.load_state_dict(state["final_net"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: incompatible checkpoint ({str(e).splitlines()[0][:160]})") from None
    with open(os.path.join(run_dir, "final.json")) as f:
        final = json.load(f)
    return cfg, net.eval(), load_data(cfg), final


def metadata(cfg: Config, dataset, final: dict, fmt: str) -> dict:
    c, h, w = dataset.image_shape
    return {"format": fmt, "input": f"float32 images (N, {c}, {h}, {w}) in [0, 1] (torchvision ToTensor), any N",
            "output": f"logits (N, {dataset.num_classes})", "classes": list(dataset.classes),
            "normalization_folded_in": {"mean": list(dataset.mean), "std": list(dataset.std), "units": "0-255"},
            "test_flip_folded_in": bool(cfg.test_flip), "genotype": final.get("genotype_str"),
            "test_acc": final.get("test_acc"), "params": final.get("params"), "dataset": dataset.name}


def export_run(run_dir: str, fmt: str = "torchscript", out: str | None = None, opset: int = ONNX_OPSET) -> dict:
    """Write the file and check it (see the module's docstring); returns what the CLI prints. `opset`: ONNX only."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cfg, net, dataset, final = load_trained(run_dir)
    model = Standalone(net, dataset.mean, dataset.std, cfg.test_flip).eval()
    out = out or os.path.join(run_dir, "model.pt" if fmt == "torchscript" else "model.onnx")
    meta = metadata(cfg, dataset, final, fmt)
    c, h, w = dataset.image_shape
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    tmp = out + ".tmp"
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, tmp, _extra_files={"aso-se.json": json.dumps(meta)})
        else:
            _onnx(model, example, tmp, meta, opset)
    os.replace(tmp, out)
    return {"file": out, "format": fmt, **verify(out, fmt, cfg, net, dataset, final)}


def _onnx(model: nn.Module, example: torch.Tensor, path: str, meta: dict, opset: int) -> None:
    import onnx
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                dynamic_shapes={"images": {0: batch}}, opset_version=opset, verbose=False)
    program.save(path)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "aso-se", json.dumps(meta)
    onnx.save(proto, path)


def runner(path: str, fmt: str):
    """A function from float32 numpy images to numpy logits, through the file alone."""
    if fmt == "torchscript":
        m = torch.jit.load(path)
        return lambda x: m(torch.from_numpy(x)).detach().numpy()
    import onnxruntime
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})[0]


def engine_logits(cfg: Config, net: Network, dataset, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(the first `n` test images as the exported model takes them, the engine's logits for them): the engine's
    own test loader (its normalization) and its evaluation forward, with the flip the run tested with."""
    x_test, y_test = make_splits(dataset, cfg.val_fraction, cfg.seed)["test"]
    n = min(n, len(y_test))
    loader = make_loader(cfg.loader, x_test[:n], y_test[:n], n, train=False, augment=train_augment(dataset),
                         device="cpu", seed=cfg.seed)
    xs, _ = next(iter(loader))
    with torch.no_grad():
        ref = net(xs)
        if cfg.test_flip:
            ref = 0.5 * (ref + net(xs.flip(-1)))
    return as_input(x_test[:n]), ref.numpy()


def as_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images as the exported model takes them: float32 NCHW in [0, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def verify(path: str, fmt: str, cfg: Config, net: Network, dataset, final: dict, compare: int = 256) -> dict:
    """The file against the engine (`engine_logits`) on the first `compare` test images, and the file's accuracy on
    the whole test split."""
    run = runner(path, fmt)
    x, ref = engine_logits(cfg, net, dataset, compare)
    diff = float(np.abs(run(x) - ref).max())
    x_test, y_test = make_splits(dataset, cfg.val_fraction, cfg.seed)["test"]
    correct = sum(int((run(as_input(x_test[i:i + 500])).argmax(1) == y_test[i:i + 500]).sum())
                  for i in range(0, len(y_test), 500))
    acc = round(correct / len(y_test), 5)
    return {"max_abs_diff": diff, "compared": len(ref), "test_acc": acc, "run_test_acc": final["test_acc"],
            "test_acc_matches": acc == final["test_acc"]}
