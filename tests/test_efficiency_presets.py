"""Efficiency presets: paper-format ratios, crossover and growth, skip-after-oom, the CPU quick
versions of both presets end to end, --compile / --profile, the report's preset section."""

from __future__ import annotations

import math
import re
import shutil

import pandas as pd
import pytest
import torch

import harness.measure
import harness.runner
from harness.cli import main
from harness.config import config_hash
from harness.efficiency_presets import PRESETS, QUICK_PRESETS, get_efficiency_preset
from harness.measure import CellOutcome, EfficiencyCell
from harness.registry import REGISTRY
from harness.report import build_report
from harness.report_efficiency import (
    backbone_text,
    crossover_length,
    crossovers,
    growth,
    paper_ratios,
    scaling_table,
)
from harness.runner import SKIPPED_AFTER_OOM, SKIPPED_AFTER_TOO_SLOW, plan_shapes, run_cells
from harness.store import Store

SUBSET = "transformer_vanilla,transformer_sdpa,longvq"


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core runner two spinning OpenMP threads per process
    make tiny steps 10-50x slower; the tests check the pipeline, not the speed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _row(model, seq_len, ms, mem, status="ok", batch=8, **extra):
    return {"model": model, "seq_len": seq_len, "batch": batch, "status": status,
            "ms_median": ms, "peak_mem_mib": mem, "device": "gpu", "dtype": "bf16",
            "d_model": 128, "n_layers": 2, "d_ffn": 256, "n_heads": 4, "head": "cls",
            "preset": "paper-text4k", "compile": False, "message": "", **extra}


# -- ratio math ---------------------------------------------------------------------------------
def test_paper_ratios_hand_example():
    frame = pd.DataFrame([
        _row("transformer_vanilla", 4096, 53.0, 10_000.0),
        _row("transformer_sdpa", 4096, 5.0, 500.0),
        _row("longvq", 4096, 10.0, 1_000.0),
        _row("mamba", 4096, None, None, status="oom"),
        _row("longvq", 8192, 30.0, 2_000.0),  # no reference at 8K
    ])
    out = paper_ratios(frame).set_index(["model", "seq_len"])
    lv = out.loc[("longvq", 4096)]
    assert lv["speed_x_vanilla"] == pytest.approx(5.3)  # 53 ms / 10 ms
    assert lv["mem_x_vanilla"] == pytest.approx(10.0)  # 10000 MiB / 1000 MiB
    assert lv["speed_x_sdpa"] == pytest.approx(0.5)
    assert lv["mem_x_sdpa"] == pytest.approx(0.5)
    assert out.loc[("transformer_vanilla", 4096)]["speed_x_vanilla"] == pytest.approx(1.0)
    assert out.loc[("transformer_sdpa", 4096)]["speed_x_vanilla"] == pytest.approx(10.6)
    assert math.isnan(out.loc[("mamba", 4096)]["speed_x_vanilla"])
    assert math.isnan(out.loc[("longvq", 8192)]["speed_x_vanilla"])


def test_ratios_never_mix_runs():
    """A reference of another batch or compile setting is not a reference for this row."""
    frame = pd.DataFrame([
        _row("transformer_vanilla", 4096, 50.0, 100.0, batch=4),
        _row("longvq", 4096, 10.0, 10.0),
        _row("transformer_vanilla", 4096, 40.0, 100.0, compile=True),
    ])
    out = paper_ratios(frame)
    assert math.isnan(out.loc[1, "speed_x_vanilla"])


# -- crossover and growth -----------------------------------------------------------------------
REF = {1024: 1.0, 2048: 2.0, 4096: 4.0, 8192: 10.0, 16384: None}  # sdpa oom at 16K


@pytest.mark.parametrize(("model", "expected"), [
    ({1024: 2.0, 2048: 3.0, 4096: 3.0, 8192: 5.0, 16384: 9.0}, 4096),  # crosses at 4K, stays
    ({1024: 0.5, 2048: 1.0, 4096: 2.0, 8192: 3.0, 16384: 5.0}, 1024),  # faster everywhere
    ({1024: 5.0, 2048: 6.0, 4096: 8.0, 8192: 20.0, 16384: None}, None),  # never faster
    ({1024: 0.5, 2048: 1.0, 4096: 5.0, 8192: 12.0, 16384: None}, None),  # faster, then slower
    ({1024: 0.5, 2048: 3.0, 4096: 3.0, 8192: 5.0}, 4096),  # slower at 2K, faster again from 4K
    ({1024: 2.0, 2048: 1.0, 4096: 4.0, 8192: 9.0, 16384: 7.0}, 8192),  # a tie is not faster
])
def test_crossover_hand_examples(model, expected):
    assert crossover_length(model, REF) == expected


def test_crossover_failures():
    # the model fails where the reference runs: not faster there
    assert crossover_length({1024: 0.5, 2048: None}, {1024: 1.0, 2048: 2.0}) is None
    # both fail at the long end: unknown, the crossover stands
    assert crossover_length({1024: 0.5, 2048: None}, {1024: 1.0, 2048: None}) == 1024
    # the reference was not run at 2K: unknown
    assert crossover_length({1024: 0.5, 2048: 9.0}, {1024: 1.0}) == 1024


def test_crossovers_and_growth_from_rows():
    rows = []
    for length, batch in ((1024, 64), (8192, 8), (65536, 1)):
        rows.append(_row("transformer_sdpa", length, 10.0 * length / 1024, 1.0, batch=batch))
        rows.append(_row("longvq", length, 40.0, 1.0, batch=batch))  # flat: linear in L
    rows.append(_row("transformer_vanilla", 1024, 5.0, 1.0, batch=64))
    rows.append(_row("transformer_vanilla", 8192, None, None, status="oom", batch=8))
    rows.append(_row("transformer_vanilla", 65536, None, None, status="oom", batch=1,
                     message="skipped-after-oom: ..."))
    frame = pd.DataFrame(rows)
    assert crossovers(frame) == {"longvq": 8192, "transformer_vanilla": None}
    lv = frame[frame["model"] == "longvq"]
    step_x, seq_x = growth(lv, 8192, 65536)
    assert step_x == pytest.approx(1.0) and seq_x == pytest.approx(8.0)
    assert growth(frame[frame["model"] == "transformer_vanilla"], 8192, 65536) is None
    table, _ = scaling_table(frame)
    by_model = {r[0]: r for r in table.rows}
    assert by_model["longvq"][1:] == ["8K", "", "1.00×", "8.00×", "yes"]
    assert by_model["transformer_sdpa"][1] == "(reference)"
    assert by_model["transformer_sdpa"][4:] == ["64.00×", "no"]  # quadratic: 8 x 8
    assert by_model["transformer_vanilla"][1:3] == ["–", "8K"]


# -- skip after oom ----------------------------------------------------------------------------
def _fake_measure(fail_from: int, status: str = "oom", message: str = "OutOfMemoryError: x"):
    calls: list[tuple[int, int]] = []

    def fake(entry, model_config, cell, max_step_s=None):
        calls.append((cell.seq_len, cell.batch))
        if cell.seq_len >= fail_from:
            return CellOutcome(status, message)
        return CellOutcome("ok", "", {"ms_median": 1.0, "peak_mem_mib": 1.0,
                                      "tokens_per_s": 1.0, "backend": "fake", "params": 1})
    return fake, calls


SHAPES = [(128, 8), (256, 4), (512, 2), (1024, 1)]


def _plan(entries=("transformer_sdpa",)):
    return plan_shapes(REGISTRY.resolve(entries), SHAPES, "cpu", "fp32", {}, 1, 1, 0,
                       preset="scaling")


def test_skip_after_oom_records_longer_lengths_without_running(tmp_path, monkeypatch):
    fake, calls = _fake_measure(fail_from=256)
    monkeypatch.setattr(harness.runner, "measure", fake)
    store = Store(tmp_path / "b.db")
    planned = _plan()
    run_cells(planned, store, skip_after_failure=True)
    assert calls == [(128, 8), (256, 4)]  # 512 and 1024 never ran
    rows = store.dataframe("efficiency").set_index("seq_len")
    assert list(rows["status"].sort_index()) == ["ok", "oom", "oom", "oom"]
    assert rows.loc[512, "message"].startswith(SKIPPED_AFTER_OOM)
    assert "L=256" in rows.loc[512, "message"]
    assert rows.loc[512, "skipped"] == "after-oom" and rows.loc[512, "preset"] == "scaling"
    assert not rows.loc[256, "message"].startswith("skipped")  # the real failure
    # a rerun runs nothing (all final), a fresh store without skipping runs every cell
    calls.clear()
    run_cells(planned, store, skip_after_failure=True)
    assert calls == []
    run_cells(planned, Store(tmp_path / "c.db"), skip_after_failure=False)
    assert calls == SHAPES


def test_skip_after_oom_found_in_store_and_per_model(tmp_path, monkeypatch):
    """A resumed sweep still skips after an oom stored by the earlier run; another model is
    not affected by this model's failure."""
    fake, calls = _fake_measure(fail_from=256)
    monkeypatch.setattr(harness.runner, "measure", fake)
    store = Store(tmp_path / "b.db")
    planned = _plan(("transformer_sdpa", "transformer_vanilla"))
    run_cells(planned[:2], store, skip_after_failure=True)  # stopped after sdpa's oom at 256
    calls.clear()
    fake_vanilla_ok, _ = _fake_measure(fail_from=10**9)

    def per_model(entry, model_config, cell, max_step_s=None):
        calls.append((cell.model, cell.seq_len))
        return (fake if cell.model == "transformer_sdpa" else fake_vanilla_ok)(
            entry, model_config, cell)
    monkeypatch.setattr(harness.runner, "measure", per_model)
    run_cells(planned, store, skip_after_failure=True)
    assert calls == [("transformer_vanilla", length) for length, _ in SHAPES]
    rows = store.dataframe("efficiency")
    sdpa = rows[rows["model"] == "transformer_sdpa"].set_index("seq_len")["message"]
    assert sdpa[512].startswith(SKIPPED_AFTER_OOM) and sdpa[1024].startswith(SKIPPED_AFTER_OOM)


def test_skip_rule_needs_as_many_tokens():
    """An oom at (L0, B0) covers (L, B) only when L >= L0 and B*L >= B0*L0."""
    failures = [(256, 4, "oom")]
    assert harness.runner.covering_failure(failures, 512, 2) is not None
    assert harness.runner.covering_failure(failures, 512, 1) is None  # fewer tokens
    assert harness.runner.covering_failure(failures, 128, 64) is None  # shorter


def test_too_slow_skips_longer_lengths_as_error(tmp_path, monkeypatch):
    fake, calls = _fake_measure(fail_from=512, status="error",
                                message="too-slow: warm-up step 1 took 9.0 s > limit 5 s")
    monkeypatch.setattr(harness.runner, "measure", fake)
    store = Store(tmp_path / "b.db")
    run_cells(_plan(), store, skip_after_failure=True)
    assert calls == SHAPES[:3]
    rows = store.dataframe("efficiency").set_index("seq_len")
    assert rows.loc[1024, "status"] == "error"
    assert rows.loc[1024, "message"].startswith(SKIPPED_AFTER_TOO_SLOW)


def test_max_step_s_stops_a_slow_cell(one_thread):
    entry = REGISTRY.get("transformer_sdpa")
    config = entry.make_config(d_model=32, n_layers=1, n_heads=2, d_ffn=64)
    cell = EfficiencyCell("transformer_sdpa", 32, 2, "cpu", "fp32", warmup=2, steps=1)
    outcome = harness.measure.measure(entry, config, cell, max_step_s=1e-9)
    assert outcome.status == "error" and outcome.message.startswith("too-slow")
    assert harness.measure.measure(entry, config, cell).status == "ok"


# -- compile field -----------------------------------------------------------------------------
def test_compile_and_graph_off_keep_old_keys_and_on_change_them():
    entry = REGISTRY.get("transformer_sdpa")
    config = entry.make_config()
    cell = EfficiencyCell("transformer_sdpa", 64, 2, "cpu", "fp32")
    old_payload = {"kind": "efficiency", "cell": {k: v for k, v in cell.to_dict().items()
                                                  if k not in ("compile", "cuda_graph")},
                   "model_config": config.to_dict(), "device_name": "dev"}
    assert harness.runner.cell_key(cell, config, "dev") == config_hash(old_payload)
    compiled = EfficiencyCell("transformer_sdpa", 64, 2, "cpu", "fp32", compile=True)
    graphed = EfficiencyCell("transformer_sdpa", 64, 2, "cpu", "fp32", cuda_graph=True)
    keys = {harness.runner.cell_key(c, config, "dev") for c in (cell, compiled, graphed)}
    assert len(keys) == 3
    assert harness.runner.cell_key(cell, config, "dev", "scaling") != config_hash(old_payload)


def test_memory_budget_keyed_only_below_one_and_needs_compile(tmp_path, capsys):
    entry = REGISTRY.get("longvq")
    default, lean = entry.make_config(), entry.make_config(activation_memory_budget="0.5")
    # at torch's default the config describes itself as before the field existed
    assert "activation_memory_budget" not in default.to_dict()
    assert lean.to_dict()["activation_memory_budget"] == 0.5
    cell = EfficiencyCell("longvq", 64, 2, "cpu", "fp32", compile=True)
    assert harness.runner.cell_key(cell, default, "d") != harness.runner.cell_key(cell, lean, "d")
    with pytest.raises(ValueError, match="activation_memory_budget=1.5"):
        entry.make_config(activation_memory_budget=1.5)
    argv = ["efficiency", "--models", "longvq[activation_memory_budget=0.5]", "--lengths",
            "32", "--batch", "2", "--device", "cpu", "--quick", "--store", str(tmp_path / "b.db")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "activation_memory_budget=0.5" in err and "--compile" in err


def test_compile_flag_wraps_the_model_and_is_recorded(tmp_path, monkeypatch, one_thread):
    compiled: list[str] = []

    def eager_compile(model):  # dynamo with the eager backend: no C++ toolchain, fast
        compiled.append(type(model).__name__)
        return torch.compile(model, backend="eager")
    monkeypatch.setattr(harness.measure, "compile_model", eager_compile)
    argv = ["efficiency", "--models", "transformer_sdpa", "--lengths", "32", "--batch", "2",
            "--device", "cpu", "--quick", "--warmup", "1", "--steps", "1", "--store",
            str(tmp_path / "b.db")]
    assert main([*argv, "--compile"]) == 0 and main(argv) == 0
    assert len(compiled) == 1
    rows = Store(tmp_path / "b.db").dataframe("efficiency")
    assert sorted(rows["compile"]) == [False, True] and set(rows["status"]) == {"ok"}


def test_memory_budget_is_recorded_per_row_and_stated(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(harness.measure, "compile_model",
                        lambda m: torch.compile(m, backend="eager"))
    lean = "transformer_sdpa[activation_memory_budget=0.5]"
    out = tmp_path / "out"
    assert main(["efficiency", "--models", f"transformer_sdpa,{lean}", "--lengths", "32",
                 "--batch", "2", "--device", "cpu", "--quick", "--warmup", "1", "--steps", "1",
                 "--compile", "--store", str(tmp_path / "b.db"), "--out", str(out)]) == 0
    rows = pd.read_csv(out / "efficiency.csv").set_index("model")
    assert rows.loc[lean, "activation_memory_budget"] == 0.5
    assert rows.loc["transformer_sdpa", "activation_memory_budget"] == 1.0
    assert f"activation memory budget 0.5 ({lean})" in backbone_text(rows.reset_index())


@pytest.mark.parametrize("model", [*REGISTRY.names(), "longvq[key_grad=window]",
                                   "longvq[ssm_conv=chunked]",
                                   "longvq[key_grad=window;activation_memory_budget=0.5]"])
def test_compiled_models_train_like_eager_and_compile_once(model, one_thread):
    """--compile of every entry: compiled steps give eager's losses (aot_eager: the same ops,
    traced) and nothing recompiles after step 1 -- e.g. the VQ models' codebook update runs
    eager (a graph break), so the first step's data init of the codebook cannot recompile the
    layer."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from harness.measure import build_step
    from harness.registry import parse_model_spec

    spec = parse_model_spec(model)
    head = {} if spec.entry.bidirectional else {"head": "lm"}
    config = spec.entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64,
                                    **head, **dict(spec.overrides))
    counter = CompileCounterWithBackend("aot_eager")
    losses, frames = {}, []
    for compile_on in (False, True):
        cell = EfficiencyCell(spec.label, 64, 2, "cpu", "fp32", seed=5, compile=compile_on)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(harness.measure, "compile_model",
                          lambda m: (torch._dynamo.reset(), torch.compile(m, backend=counter))[1])
            step = build_step(spec.entry, config, cell, torch.device("cpu")).step
            runs = []
            for _ in range(3):
                runs.append(step())
                frames.append(counter.frame_count)
        losses[compile_on] = torch.stack(runs)
    assert frames[3] > 0 and frames[4] == frames[5] == frames[3], frames  # compiled on step 1 only
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def test_embedding_and_readout_compile_despite_graph_breaks_in_blocks(one_thread):
    """LongVQ's blocks have a graph break on CPU (the torch VQ attention op; the codebook
    snapshot and update run before and after the model's forward). Dynamo then runs the model's
    own forward eagerly, so the embedding and the readout (final norm, mean pooling, head) must
    be frames of their own to be compiled at all."""
    from harness.registry import parse_model_spec

    spec = parse_model_spec("longvq[key_grad=window]")
    model = spec.entry.build(spec.entry.make_config(d_model=32, n_layers=2, n_heads=2,
                                                    d_ffn=64, **dict(spec.overrides)))
    graphs: list[set[str]] = []

    def record(gm, _inputs):
        graphs.append({str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes})
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record)(torch.randint(0, 100, (2, 64)))
    torch._dynamo.reset()
    assert len(graphs) > 2  # the blocks do break the graph
    assert any("embedding" in g for g in graphs), graphs
    assert any({"layer_norm", "mean", "linear"} <= g for g in graphs), graphs


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_longvq_compiles_with_inductor(one_thread):
    """The real backend (inductor, on CPU here): its partitioner may save graph inputs (the
    codebook buffer) for the backward instead of activations, so the traced graph must see only
    a copy of the codebook (the quantiser's eager snapshot), never the buffer its eager EMA
    update mutates in place -- aot_eager above cannot see that."""
    from harness.measure import build_step
    from harness.registry import parse_model_spec

    spec = parse_model_spec("longvq[key_grad=window]")
    config = spec.entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64,
                                    **dict(spec.overrides))
    losses = {}
    for compile_on in (False, True):
        cell = EfficiencyCell(spec.label, 64, 2, "cpu", "fp32", seed=5, compile=compile_on)
        step = build_step(spec.entry, config, cell, torch.device("cpu")).step
        losses[compile_on] = torch.stack([step() for _ in range(3)])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)


def test_cuda_graph_needs_cuda(tmp_path, capsys):
    code = main(["efficiency", "--models", "transformer_sdpa", "--lengths", "32", "--device",
                 "cpu", "--cuda-graph", "--store", str(tmp_path / "b.db")])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graph" in err and len(err.splitlines()) == 1
    cell = EfficiencyCell("transformer_sdpa", 32, 2, "cpu", "fp32", cuda_graph=True)
    entry = REGISTRY.get("transformer_sdpa")
    config = entry.make_config(**harness.runner.QUICK_BACKBONE)
    outcome = harness.measure.measure(entry, config, cell)
    assert outcome.status == "error" and "cuda_graph needs a CUDA device" in outcome.message


# -- presets through the CLI -------------------------------------------------------------------
def test_unknown_preset_exits_2(tmp_path, capsys):
    code = main(["efficiency", "--preset", "paper-text8k", "--device", "cpu",
                 "--store", str(tmp_path / "b.db")])
    err = capsys.readouterr().err
    assert code == 2
    assert "'paper-text8k'" in err and "paper-text4k" in err and len(err.splitlines()) == 1
    code = main(["efficiency", "--preset", "scaling", "--batch", "2", "--device", "cpu",
                 "--store", str(tmp_path / "b.db")])
    assert code == 2 and "--batch" in capsys.readouterr().err
    code = main(["efficiency", "--preset", "scaling", "--lengths", "1024,3000", "--device",
                 "cpu", "--store", str(tmp_path / "b.db")])
    err = capsys.readouterr().err
    assert code == 2 and "3000" in err and "65536" in err and len(err.splitlines()) == 1


def test_preset_lengths_subset_runs_those_cells_with_the_preset_batch(tmp_path, one_thread):
    store = tmp_path / "b.db"
    assert main(["efficiency", "--preset", "scaling", "--quick", "--lengths", "256",
                 "--models", "transformer_sdpa", "--device", "cpu", "--store", str(store)]) == 0
    rows = Store(store).dataframe("efficiency")
    assert list(rows["seq_len"]) == [256] and list(rows["batch"]) == [1024 // 256]
    assert set(rows["preset"]) == {"scaling"} and set(rows["status"]) == {"ok"}


def test_preset_definitions():
    paper = get_efficiency_preset("paper-text4k")
    assert paper.shapes() == [(4096, 8)] and paper.backbone["vocab_size"] == 257
    scaling = PRESETS["scaling"]
    assert [length for length, _ in scaling.shapes()] == [1024 * 2**i for i in range(7)]
    assert {length * batch for length, batch in scaling.shapes()} == {65536}
    assert scaling.growth == (8192, 65536)
    quick = QUICK_PRESETS["scaling"]
    assert {length * batch for length, batch in quick.shapes()} == {1024}
    with pytest.raises(ValueError, match="exactly one"):
        type(paper)("x", "", (1,), {}, batch=1, tokens_per_step=2)


def test_quick_paper_preset_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    variant = "longvq[key_grad=window]"
    code = main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--models", f"{SUBSET},{variant}", "--store", str(tmp_path / "b.db"),
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "d_model 32, 1 layers, FFN 64, 2 heads, batch 2" in printed
    assert "speed ×" in printed and "memory ×" in printed
    assert "longvq[key_grad=window]" in printed  # not eaten as rich markup
    table = pd.read_csv(out / "paper-text4k.csv").set_index("model")
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    # the variant is its own row, with its own ratios and its config in the store
    assert table.loc[variant, "speed_x_sdpa"] == pytest.approx(
        table.loc["transformer_sdpa", "ms_median"] / table.loc[variant, "ms_median"])
    stored = Store(tmp_path / "b.db").dataframe("efficiency").set_index("model")
    assert stored.loc[variant, "key_grad"] == "window"
    assert stored.loc["longvq", "key_grad"] == "ste"
    assert set(table["seq_len"]) == {256} and set(table["batch"]) == {2}
    assert set(table["vocab_size"]) == {257} and set(table["head"]) == {"cls"}
    assert table.loc["transformer_vanilla", "speed_x_vanilla"] == pytest.approx(1.0)
    lv = table.loc["longvq"]
    assert lv["speed_x_vanilla"] == pytest.approx(
        table.loc["transformer_vanilla", "ms_median"] / lv["ms_median"])
    assert lv["mem_x_sdpa"] == pytest.approx(
        table.loc["transformer_sdpa", "peak_mem_mib"] / lv["peak_mem_mib"])
    assert (table["params"] > 0).all() and not table["compile"].any()
    md = (out / "paper-text4k.md").read_text()
    assert "| speed × vanilla | memory × vanilla | speed × sdpa | memory × sdpa |" in md
    assert "Backbone: d_model 32, n_layers 1, d_ffn 64, n_heads 2, vocab 257" in md


def test_quick_scaling_preset_end_to_end_and_report(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    store = tmp_path / "b.db"
    code = main(["efficiency", "--preset", "scaling", "--quick", "--device", "cpu",
                 "--models", SUBSET, "--store", str(store), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "crossover with transformer_sdpa: longvq " in printed
    rows = pd.read_csv(out / "scaling.csv")
    assert len(rows) == 12 and set(rows["preset"]) == {"scaling"}
    assert set(rows["seq_len"] * rows["batch"]) == {1024}
    assert (out / "scaling_time_vs_length.png").stat().st_size > 1000
    assert (out / "scaling_memory_vs_length.png").stat().st_size > 1000
    md = (out / "scaling.md").read_text()
    assert "crossover vs sdpa" in md and "per-sequence time × 128 → 1K" in md
    # #7's "< 10 minutes": the run states its own wall time, in the log and the table's file
    assert re.search(r"Wall time of this run: \d+ s \([\d.]+ min\) for 12 measured cells;",
                     printed), printed[-400:]
    assert "Wall time of this run:" in md
    # a rerun measures nothing and says so
    assert main(["efficiency", "--preset", "scaling", "--quick", "--device", "cpu",
                 "--models", SUBSET, "--store", str(store)]) == 0
    assert "for 0 measured cells (12 of 12 already in the store" in capsys.readouterr().out
    # the report shows the preset section next to plain efficiency rows
    assert main(["efficiency", "--models", "transformer_sdpa", "--lengths", "32", "--device",
                 "cpu", "--quick", "--warmup", "1", "--steps", "1", "--store", str(store)]) == 0
    report = build_report(Store(store), tmp_path / "report")
    text = report.read_text()
    assert "## Efficiency\n" in text and "## Efficiency presets" in text
    assert "preset=scaling" in text and "crossover vs sdpa" in text
    assert "speed × vanilla" in text and "_time_vs_length.png" in text
    plots = list((tmp_path / "report" / "plots").glob("preset-scaling*_time_vs_length.png"))
    assert len(plots) == 1


def test_profile_writes_top_kernels(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    code = main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--profile", "transformer_sdpa", "--store", str(tmp_path / "b.db"),
                 "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out / "profile_transformer_sdpa_L256.csv")
    assert 1 <= len(table) <= 20 and list(table["rank"]) == list(range(1, len(table) + 1))
    assert table["self_ms_total"].is_monotonic_decreasing
    assert (out / "profile_transformer_sdpa_L256.md").read_text().count("|") > 20
    categories = pd.read_csv(out / "profile_transformer_sdpa_L256_categories.csv")
    assert categories["self_pct"].sum() == pytest.approx(100.0)
    assert "GEMM" in set(categories["category"])  # the projections' aten::addmm / mm
    assert "| total |" in (out / "profile_transformer_sdpa_L256.md").read_text()
    assert "self CPU time" in capsys.readouterr().out
    assert not (tmp_path / "b.db").exists() or Store(tmp_path / "b.db").dataframe().empty
    assert main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--profile", "transformer_sdpa", "--profile-top", "3", "--out", str(out),
                 "--store", str(tmp_path / "b.db")]) == 0
    assert len(pd.read_csv(out / "profile_transformer_sdpa_L256.csv")) == 3
    capsys.readouterr()
    assert main(["efficiency", "--profile", "transformer_sdpa", "--profile-top", "0",
                 "--device", "cpu", "--store", str(tmp_path / "b.db")]) == 2
    assert "--profile-top: 0" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gpu_presets_plan_every_entry(name):
    """The full-size presets build a valid config for every entry (planning only, no run);
    causal-only entries get their LM head, the others the classification head."""
    preset = PRESETS[name]
    entries = REGISTRY.entries()
    planned = plan_shapes(entries, preset.shapes(), "cpu", "bf16", dict(preset.backbone),
                          preset.warmup, preset.steps, 0, preset=name,
                          max_step_s=preset.max_step_s)
    assert len(planned) == len(entries) * len(preset.lengths)
    assert len({p.key for p in planned}) == len(planned)
    for item in planned:
        cfg = item.model_config
        assert (cfg.d_model, cfg.n_layers, cfg.d_ffn, cfg.n_heads) == (128, 2, 256, 4)
        assert cfg.vocab_size == 257
        assert cfg.head == ("cls" if item.entry.bidirectional else "lm")


def test_profile_of_unknown_model_exits_2(tmp_path, capsys):
    code = main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--profile", "longvqq", "--store", str(tmp_path / "b.db")])
    assert code == 2 and "longvq" in capsys.readouterr().err


def test_model_variants_parse_and_fail_clearly():
    from harness.registry import parse_model_spec, resolve_model_specs, split_model_list

    assert split_model_list("a, b[x=1;y=2] ,c") == ["a", "b[x=1;y=2]", "c"]
    spec = parse_model_spec("longvq[key_grad=window; window=32]")
    assert spec.label == "longvq[key_grad=window;window=32]"
    assert spec.entry.name == "longvq" and dict(spec.overrides)["window"] == "32"
    specs = resolve_model_specs("transformer_sdpa,longvq,longvq[key_grad=window],longvq")
    assert [s.label for s in specs] == ["transformer_sdpa", "longvq", "longvq[key_grad=window]"]
    assert len(resolve_model_specs("all")) == len(REGISTRY.entries())
    for bad, words in (("longvq[key_grad=foo]", ("key_grad", "foo")),
                       ("longvq[keygrad=window]", ("keygrad", "key_grad")),
                       ("longvq[key_grad]", ("field=value",)),
                       ("longvq[key_grad=window", ("name[field=value",))):
        with pytest.raises(ValueError) as err:
            parse_model_spec(bad)
        assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_model_variant_exits_2(tmp_path, capsys):
    code = main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--models", "longvq[key_grad=fast]", "--store", str(tmp_path / "b.db")])
    err = capsys.readouterr().err
    assert code == 2 and "longvq[key_grad=fast]" in err and "key_grad" in err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gpu_presets_plan_their_variants(name):
    """--models all adds the preset's variants (the VQ models with key_grad=window) as rows of
    their own: distinct keys, the variant's field set, the backbone kept."""
    from harness.registry import parse_model_spec

    preset = PRESETS[name]
    specs = [parse_model_spec(v) for v in preset.variants]
    assert {s.label for s in specs} == {"longvq[key_grad=window]",
                                        "transformer_vq[key_grad=window]"}
    planned = plan_shapes([*REGISTRY.entries(), *specs], preset.shapes()[:1], "cpu", "bf16",
                          dict(preset.backbone), preset.warmup, preset.steps, 0, preset=name)
    assert len({p.key for p in planned}) == len(planned) == len(REGISTRY.entries()) + 2
    by_label = {p.cell.model: p.model_config for p in planned}
    assert by_label["longvq[key_grad=window]"].key_grad == "window"
    assert by_label["longvq"].key_grad == "ste"
    assert by_label["longvq[key_grad=window]"].d_model == 128



@pytest.mark.parametrize("quick", [False, True])
def test_lean_variant_is_planned_only_compiled(quick):
    """paper-text4k's memory-lean LongVQ (activation_memory_budget < 1) exists only compiled:
    an eager plan of it is an error."""
    from harness.registry import parse_model_spec

    preset = get_efficiency_preset("paper-text4k", quick=quick)
    specs = [parse_model_spec(v) for v in preset.compiled_variants]
    args = (dict(preset.backbone), preset.warmup, preset.steps, 0)
    planned = plan_shapes(specs, preset.shapes(), "cpu", "bf16", *args, compile=True)
    assert [p.model_config.activation_memory_budget for p in planned] == [0.5]
    assert planned[0].model_config.key_grad == "window"
    with pytest.raises(ValueError, match="--compile"):
        plan_shapes(specs, preset.shapes(), "cpu", "bf16", *args)


def test_models_all_adds_the_lean_variant_with_compile(tmp_path, monkeypatch):
    fake, _ = _fake_measure(fail_from=1 << 30)
    monkeypatch.setattr(harness.runner, "measure", fake)
    models = {}
    for flags in ([], ["--compile"]):
        store = tmp_path / f"b{len(flags)}.db"
        assert main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                     "--store", str(store), *flags]) == 0
        models[bool(flags)] = set(Store(store).dataframe("efficiency")["model"])
    lean = set(QUICK_PRESETS["paper-text4k"].compiled_variants)
    assert lean <= models[True] and not lean & models[False]
    assert models[True] - lean == models[False]
