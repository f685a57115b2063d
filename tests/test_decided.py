"""bench/decided.py: how decided a search's derived edges are, and whether two searches decide alike."""
import json

import numpy as np
import torch
import pytest

from engine.genotype import CELL_TYPES, Genotype, edge_index, num_edges
from engine.ops import PRIMITIVES

from .conftest import load_bench

decided = load_bench("decided")
SEP3, SKIP = (PRIMITIVES.index(op) for op in ("sep_conv_3x3", "skip_connect"))


def fake_run(path, genotype: Genotype, probs: dict[str, np.ndarray]) -> str:
    path.mkdir()
    (path / "genotype.json").write_text(json.dumps(genotype.to_json()))
    uniform = {t: np.full_like(p, 1 / 8).tolist() for t, p in probs.items()}
    records = [{"phase": "search", "epoch": 1, "probs": uniform},
               {"phase": "growth", "epoch": 1, "probs": {t: p.tolist() for t, p in probs.items()}},
               {"phase": "final", "test_acc": 0.5}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_counts_the_derived_non_skip_ops_at_twice_uniform_and_compares_runs(tmp_path, capsys):
    pairs = [("sep_conv_3x3", 0), ("skip_connect", 1)] * 4
    g = Genotype(pairs, [2, 3, 4, 5], pairs, [2, 3, 4, 5])
    edges = num_edges(4)
    probs = {t: np.full((edges, 8), 1 / 8) for t in CELL_TYPES}
    for k, (op, src) in enumerate(pairs):   # normal: the 4 derived sep3 at 0.30, 0.20, 0.30, 0.20; skips at 0.5
        e = edge_index(k // 2, src)
        row = np.full(8, 0.0)
        if op == "sep_conv_3x3":
            row[SEP3] = 0.30 if k % 4 == 0 else 0.20
        else:
            row[SKIP] = 0.5
        row[row == 0] = (1 - row.sum()) / 7
        probs["normal"][e] = row
    other = {t: p[::-1].copy() for t, p in probs.items()}   # the edges in reverse order
    a = fake_run(tmp_path / "a", g, probs)
    b = fake_run(tmp_path / "b", g, other)
    out = tmp_path / "d.json"
    assert decided.main([a, b, "--json", str(out)]) == 0   # the last record with probabilities counts
    data = json.loads(out.read_text())
    normal = data["runs"][a]["normal"]
    assert normal["non_skip"] == 4 and normal["at_twice_uniform"] == 2
    assert normal["p_min"] == pytest.approx(0.2) and normal["p_max"] == pytest.approx(0.3)
    assert data["runs"][a]["reduce"]["at_twice_uniform"] == 0   # uniform: nothing decided
    [same] = [r for r in data["pairs"] if r["cell"] == "normal"]
    assert same["a"] == a and same["b"] == b
    assert decided.agreement(probs["normal"], probs["normal"])["same_top_conv"] == edges
    assert decided.agreement(probs["normal"], probs["normal"])["skip_corr"] == pytest.approx(1.0)
    assert [r["skip_corr"] for r in data["pairs"] if r["cell"] == "reduce"] == [None]   # uniform: no direction
    assert "twice" in capsys.readouterr().out


def test_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    assert decided.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a finished search's run directory" in err and len(err.strip().splitlines()) == 1


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    pairs = [("sep_conv_3x3", 0), ("skip_connect", 1)] * 4
    g = Genotype(pairs, [2, 3, 4, 5], pairs, [2, 3, 4, 5])
    run = fake_run(tmp_path / "run", g, {t: np.full((num_edges(4), 8), 1 / 8) for t in CELL_TYPES})
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"\x00" * 64)
    assert decided.main([run]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "damaged" in err and len(err.strip().splitlines()) == 1


def test_op_rows_read_the_runs_start_its_accuracies_and_the_ops_probability(tmp_path, capsys):
    pairs = [("max_pool_3x3", 0), ("skip_connect", 1)] * 4
    g = Genotype(pairs, [2, 3, 4, 5], [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5])
    probs = {t: np.full((num_edges(4), 8), 1 / 8) for t in CELL_TYPES}
    probs["reduce"][:, PRIMITIVES.index("max_pool_3x3")] += 0.35   # the row sums do not matter here
    run = fake_run(tmp_path / "r", g, probs)
    (tmp_path / "r" / "config.json").write_text(json.dumps({"logit_prior": "reduce:max_pool_3x3=4", "arch_lr": 0.05,
                                                            "arch_start_epochs": 8.0, "shuffle_labels": False}))
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lines[0].update(train_acc=0.55, val_acc=0.70)
    lines[1].update(train_acc=0.80, val_acc=0.60)
    (tmp_path / "r" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "d.json"
    assert decided.main([run, "--op", "max_pool_3x3", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["op_rows"]
    assert row["logit_prior"] == "reduce:max_pool_3x3=4" and row["arch_start"] == 8.0 and row["shuffled"] is False
    assert row["epochs"] == 2 and row["train_acc"] == 0.80 and row["val_best"] == 0.70 and row["val_last"] == 0.60
    assert row["p_normal"] == pytest.approx(0.125) and row["p_reduce"] == pytest.approx(0.475)
    assert row["derived_normal"] == 4 and row["derived_reduce"] == 8
    assert "max_pool_3x3: mean probability" in capsys.readouterr().out


def test_each_derived_edge_gets_its_drift_against_the_next_op(tmp_path, capsys):
    """The normal cell's derived sep3 on edge 0 was pushed above the next op (max_pool) at every step; the one on
    edge 2 only by noise. Without gradient sums in the checkpoint the columns say so ('-')."""
    from engine.arch import ArchState
    from engine.checkpoint import save_checkpoint
    pairs = [("sep_conv_3x3", 0), ("skip_connect", 1)] * 4
    g = Genotype(pairs, [2, 3, 4, 5], pairs, [2, 3, 4, 5])
    probs = {t: np.full((num_edges(4), 8), 1 / 8) for t in CELL_TYPES}
    MAX3 = PRIMITIVES.index("max_pool_3x3")
    for e in (0, 2):
        probs["normal"][e] = 0.1
        probs["normal"][e, SEP3], probs["normal"][e, MAX3] = 0.25, 0.15
        probs["normal"][e] /= probs["normal"][e].sum()
    run = fake_run(tmp_path / "run", g, probs)
    state, gen = ArchState(num_edges(4)), torch.Generator().manual_seed(0)
    for _ in range(100):
        grads = [torch.randn(num_edges(4), 8, generator=gen) for _ in CELL_TYPES]
        grads[0][0, SEP3] = grads[0][0, MAX3] - 0.5    # edge 0: sep3 pushed up against max_pool at every step
        state.add_gradients(grads, torch.tensor(True))
    required = dict(config={}, spec={}, phase_index=0, epoch=0, supernet={}, arch={})
    save_checkpoint({**required, "arch_counters": {"grad_sum": state.grad_sum, "grad_outer": state.grad_outer,
                                                   "grad_steps": 100}}, str(tmp_path / "run" / "checkpoints" / "last.pt"))
    plain = fake_run(tmp_path / "plain", g, probs)
    out = tmp_path / "d.json"
    assert decided.main([run, plain, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    normal = data["runs"][run]["normal"]
    first, second = normal["edges"][0], normal["edges"][2]   # derived pairs 0 and 2: edges 0 and 2 (node 0, node 1)
    assert first["second"] == second["second"] == "max_pool_3x3"
    assert first["z_vs_second"] == pytest.approx(10.0) and abs(second["z_vs_second"]) < 3
    assert normal["z_vs_second_at_2"] == sum(e["z_vs_second"] >= 2 for e in normal["edges"] if e["op"] != "skip_connect")
    assert normal["z_vs_second_max"] == pytest.approx(10.0)
    assert data["runs"][plain]["normal"]["z_vs_second_at_2"] is None
    # every edge's contrasts: noise among the convolutions (rms about 1), and edge 0's max_pool pushed below sep3
    assert set(data["contrasts"]) == {run}
    normal = data["contrasts"][run]["normal"]
    assert normal["conv_pairs"] == 6 * num_edges(4) and 0.7 < normal["conv_rms"] < 1.3
    assert normal["max3_down"] >= 1 / (4 * num_edges(4)) and normal["max3_up"] < 0.2
    assert "drift z" in capsys.readouterr().out
