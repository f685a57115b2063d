"""The run report, TensorBoard scalars and the model export (issue 16), on one smoke run."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from engine.cli import main
from engine.config import preset
from engine.errors import CheckpointError, DataError
from engine.report import CELL_TYPES, cell_dot, write_report
from engine.trainer import Trainer

# one epoch per phase, growth included (one event), flip TTA on so the export must fold it in, and the derived
# network trained wider than the supernet (as the main job does), so its spec is not the supernet's
SMOKE = ["steps_per_epoch=4", "optimize_epochs=1", "test_flip=true", "optimize_init=fresh", "optimize_channels=6"]
FIGURES = ["curves", "architecture", "drift", "sampling", "cell_normal", "cell_reduce"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    Trainer(preset("smoke").override(SMOKE), str(out), log=lambda *_: None, tensorboard=True).run()
    return out


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------------------------------ report
def test_report_of_a_finished_run_has_every_figure_and_the_page_shows_them(smoke_run, tmp_path):
    index = write_report(str(smoke_run), str(tmp_path / "report"))
    page = open(index).read()
    for name in FIGURES:
        w, h = _png_size(tmp_path / "report" / f"{name}.png")
        assert w >= 300 and h >= 200, (name, w, h)
        root = ET.parse(tmp_path / "report" / f"{name}.svg").getroot()
        assert root.tag.endswith("svg") and os.path.getsize(tmp_path / "report" / f"{name}.svg") > 5000
        assert f'href="{name}.svg"' in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES)  # self-contained: every figure embedded
    final = json.loads((smoke_run / "final.json").read_text())
    assert f"{100 * final['test_acc']:.2f}%" in page and "Growth events" in page


def test_the_page_says_how_decided_each_derived_edge_is_and_what_the_data_pushed(smoke_run, tmp_path):
    """A table of every derived edge: its op's probability against the next op's, and the drift z of that margin
    from the checkpoint's gradient sums; without the checkpoint (an unfinished copy below) it says there is no
    drift, and a damaged checkpoint is named, not a failed report."""
    page = open(write_report(str(smoke_run), str(tmp_path / "report"))).read()
    assert "How decided the derived cells are" in page and "<th>z_vs_second</th>" in page
    assert page.count("<td>normal</td>") == 8 and page.count("<td>reduce</td>") == 8   # 8 derived edges a cell
    held = re.search(r"(\d+) hold their margin over the next op at drift z &gt;= 2", page)
    assert held is not None
    run = tmp_path / "copy"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("tensorboard", "report"))
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    page = open(write_report(str(run))).read()
    assert "(no drift:" in page and "last.pt" in page and "<th>z_vs_second</th>" not in page


def test_the_cell_diagrams_hold_every_op_of_the_genotype(smoke_run, tmp_path):
    write_report(str(smoke_run), str(tmp_path))
    genotype = json.loads((smoke_run / "genotype.json").read_text())
    for cell in CELL_TYPES:
        dot = (tmp_path / f"cell_{cell}.dot").read_text()
        svg = (tmp_path / f"cell_{cell}.svg").read_text()
        edges = re.findall(r'"([^"]+)" -> "(\d)" \[label="([a-z_0-9]+)"', dot)
        names = {0: "c_{k-2}", 1: "c_{k-1}"}
        assert edges == [(names.get(src, str(src - 2)), str(j // 2), op)
                         for j, (op, src) in enumerate(genotype[cell])]
        assert len(re.findall(r'-> "c_\{k\}"', dot)) == len(genotype[f"{cell}_concat"])
        for op, _ in genotype[cell]:  # the drawing's labels (text kept as text in the SVG)
            assert svg.count(f">{op}<") == sum(1 for o, _ in genotype[cell] if o == op), op


def test_dot_source_of_a_handwritten_genotype():
    from engine.genotype import Genotype
    g = Genotype([("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2), ("dil_conv_5x5", 0)], [2, 3],
                 [("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("skip_connect", 2), ("sep_conv_3x3", 1)], [2, 3])
    dot = cell_dot(g, "normal")
    assert '"c_{k-2}" -> "0" [label="sep_conv_3x3"' in dot and '"0" -> "1" [label="max_pool_3x3"' in dot
    assert '"c_{k-1}" -> "0" [label="skip_connect"' in dot and dot.count('-> "c_{k}"') == 2


def test_report_of_an_unfinished_run_and_of_no_run(smoke_run, tmp_path, capsys):
    run = tmp_path / "unfinished"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "report"))
    (run / "final.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # warmup and search so far
    page = open(write_report(str(run))).read()
    assert "unfinished: 2 epoch(s) so far" in page and (run / "report" / "architecture.png").is_file()
    assert "no drift: no checkpoints/last.pt" in page   # copied without checkpoints/
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(str(empty))
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aso-se: error:") and "\n" not in err
    (run / "metrics.jsonl").write_text('{"phase": "warmup", "epo')  # damaged
    with pytest.raises(DataError, match="line 1 is not JSON"):
        write_report(str(run))


# ------------------------------------------------------------------------------------------ live
def test_tensorboard_has_the_scalars_of_every_epoch(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(smoke_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "accuracy/val", "schedule/lr", "schedule/temperature", "architecture/mean_entropy",
            "speed/it_per_s", "accuracy/test"} <= tags
    records = [json.loads(line) for line in (smoke_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "epoch" in r and "event" not in r]
    assert [e.step for e in acc.Scalars("loss/train")] == [r["global_epoch"] for r in epochs]
    assert [round(e.value, 4) for e in acc.Scalars("loss/train")] == [round(r["train_loss"], 4) for r in epochs]
    final = next(r for r in records if r["phase"] == "final")
    assert acc.Scalars("accuracy/test")[0].value == pytest.approx(final["test_acc"])


# ------------------------------------------------------------------------------------------ export
LOAD = """import json, sys
import numpy as np
fmt, path, inputs, out = sys.argv[1:]
x = np.load(inputs)
if fmt == "torchscript":
    import torch
    files = {"aso-se.json": ""}
    m = torch.jit.load(path, _extra_files=files)
    meta = json.loads(files["aso-se.json"])
    run = lambda a: m(torch.from_numpy(a)).detach().numpy()
else:
    import onnx, onnxruntime
    meta = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["aso-se"])
    sess = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    run = lambda a: sess.run(None, {"images": a})[0]
outs = {str(b): np.concatenate([run(x[i:i + b]) for i in range(0, len(x), b)]) for b in (1, 3, len(x))}
assert not any(m == "engine" or m.startswith("engine.") for m in sys.modules), "ASO-SE was imported"
np.savez(out, **outs)
print(json.dumps(meta))
"""


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_exported_model_loads_without_aso_se_and_reproduces_the_run(smoke_run, tmp_path, fmt):
    from engine.export import engine_logits, export_run, load_trained
    result = export_run(str(smoke_run), fmt, str(tmp_path / f"model.{fmt}"))
    final = json.loads((smoke_run / "final.json").read_text())
    assert result["max_abs_diff"] <= 1e-4 and result["test_acc"] == final["test_acc"] and result["test_acc_matches"]
    cfg, net, dataset, _ = load_trained(str(smoke_run))
    x, ref = engine_logits(cfg, net, dataset, 256)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-c", LOAD, fmt, result["file"], str(tmp_path / "x.npy"),
                        str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads(r.stdout.strip().splitlines()[-1])
    assert meta["test_flip_folded_in"] is True and meta["test_acc"] == final["test_acc"]
    outs = np.load(tmp_path / "out.npz")
    for batch in ("1", "3", "256"):  # batch sizes other than the export's (2)
        assert outs[batch].shape == ref.shape
        assert float(np.abs(outs[batch] - ref).max()) <= 1e-4, batch
    if fmt == "onnx":  # the default opset is the one docs/running.md names (chosen by measurement there)
        import onnx

        from engine.export import ONNX_OPSET
        opsets = {o.domain: o.version for o in onnx.load(result["file"]).opset_import}
        assert opsets[""] == ONNX_OPSET
        doc = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "running.md")).read()
        assert f"(ONNX, opset {ONNX_OPSET})" in doc and f"ONNX opset {ONNX_OPSET} (default)" in doc


def test_an_export_that_does_not_reproduce_the_run_exits_3_naming_the_file(smoke_run, tmp_path, capsys, monkeypatch):
    """The CLI's own check, against a real export bug: the test-time flip left out of the exported model (the
    run tested with it). The exported logits then differ from the engine's: one line, exit 3."""
    import engine.export

    class WithoutTheFlip(engine.export.Standalone):
        def __init__(self, net, mean, std, flip):
            super().__init__(net, mean, std, False)
    monkeypatch.setattr(engine.export, "Standalone", WithoutTheFlip)
    out = tmp_path / "model.pt"
    assert main(["export", str(smoke_run), "--out", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("aso-se: error:") and "\n" not in err
    assert str(out) in err and "does not reproduce the run" in err


def test_eval_of_the_final_checkpoint_gives_the_runs_test_accuracy(smoke_run):
    from engine.evaluate import evaluate_checkpoint
    final = json.loads((smoke_run / "final.json").read_text())
    got = evaluate_checkpoint(str(smoke_run / "checkpoints" / "optimize.pt"))
    assert got["model"] == "derived network" and got["params"] == final["params"]
    assert got["accuracy"] == final["test_acc"]


def test_export_of_an_unfinished_or_damaged_run_is_refused(smoke_run, tmp_path, capsys):
    from engine.export import export_run
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, ignore=shutil.ignore_patterns("tensorboard", "report"))
    (run / "final.json").rename(run / "final.json.bak")
    with pytest.raises(CheckpointError, match="unfinished run"):
        export_run(str(run))
    (run / "final.json.bak").rename(run / "final.json")
    for name in ("optimize.pt", "last.pt"):
        (run / "checkpoints" / name).write_bytes(b"not a checkpoint")
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aso-se: error:") and "\n" not in err and "optimize.pt" in err
    assert not (run / "model.pt").exists()


# ------------------------------------------------------------------------------------------ a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian's chromium package): make report-check installs it")
def test_chromium_renders_the_report_with_no_missing_image(smoke_run, tmp_path):
    index = write_report(str(smoke_run), str(tmp_path / "report"))
    url = "file://" + os.path.abspath(index)
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert f'data-images="{len(FIGURES)}/{len(FIGURES)}"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", "--window-size=1280,3000", url],
                   capture_output=True, timeout=120)
    assert _png_size(shot) == (1280, 3000) and os.path.getsize(shot) > 50_000
