"""harness/memory_accounting.py: what a training step saves for its backward, and the CLI."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import harness.measure
from harness.cli import main
from harness.measure import EfficiencyCell
from harness.memory_accounting import (
    MemoryAccount,
    account_cell,
    live_at_peak,
    memory_tables,
    saved_for_backward,
)
from harness.registry import parse_model_spec

MIB = 2**20


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def test_saved_storages_counted_once_views_at_full_size_parameters_left_out():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(256, 64, requires_grad=True)
    hidden = x @ weight  # saves x (and the parameter, resident: not counted)
    half = hidden.sin()[:, :32]  # a view of a (256, 64) float32 storage
    loss = (half * half).sum() + half.cos().sum()  # ``half`` saved by both: one storage
    saved = saved_for_backward(loss, {_key(weight)})
    by_shape = {t.shape: t for t in saved}
    assert (256, 32) in by_shape and (256, 64) in by_shape
    view = by_shape[(256, 32)]
    assert view.tensor_bytes == 256 * 32 * 4 and view.storage_bytes == 256 * 64 * 4
    assert sum(t.shape == (256, 32) for t in saved) == 1
    assert all(t.shape != (64, 64) for t in saved)  # the parameter
    assert [t.storage_bytes for t in saved] == sorted((t.storage_bytes for t in saved),
                                                      reverse=True)


def test_saved_bytes_grow_with_length_and_modules_are_named(one_thread):
    spec = parse_model_spec("longvq[key_grad=window]")
    config = spec.entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64,
                                    **dict(spec.overrides))
    accounts = [account_cell(spec.entry, config, EfficiencyCell(spec.label, length, 2, "cpu",
                                                                "fp32", warmup=1))
                for length in (64, 128, 256)]
    short, _, long = accounts
    tensors = list(spec.entry.build(config).parameters())
    params = sum(p.numel() * 4 for p in tensors)
    assert short.parameters == params and short.gradients == params
    # AdamW: exp_avg and exp_avg_sq of each, and a scalar step (float32, or float64)
    assert 2 * params < short.optimizer_state <= 2 * params + 8 * len(tensors)
    # activations are linear in L here (the linear VQ attention, the FFT's 2L buffers, the
    # S4D kernel); the codebook and the weights' copies are not
    sizes = [a.saved_bytes for a in accounts]
    assert sizes[2] - sizes[1] == pytest.approx(2 * (sizes[1] - sizes[0]), rel=0.05)
    assert long.by_module is not None
    assert {"blocks.0.memory", "blocks.1.quantizer", "blocks.0.ffn.fc_in"} <= set(long.by_module)
    assert sum(long.by_module.values()) == pytest.approx(long.saved_bytes, rel=0.05)
    holders = {t.holder for t in long.saved}
    assert "_VQAttentionBackward" in holders  # the op's custom autograd Function
    tables = memory_tables(long, "caption", top=5)
    assert len(tables[-1].rows) == 5 and tables[0].rows[0][0] == "parameters"


def test_compiled_graphs_are_the_holders(monkeypatch, one_thread):
    monkeypatch.setattr(harness.measure, "compile_model",
                        lambda m: (torch._dynamo.reset(), torch.compile(m, backend="aot_eager"))[1])
    spec = parse_model_spec("transformer_sdpa")
    config = spec.entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64)
    account = account_cell(spec.entry, config,
                           EfficiencyCell(spec.label, 64, 2, "cpu", "fp32", warmup=1,
                                          compile=True))
    assert account.by_module is None  # no module attribution inside compiled graphs
    holders = {t.holder for t in account.saved}
    assert any(h.startswith("compiled graph 1 of ") for h in holders), holders
    assert account.saved_bytes > 0


def test_memory_budget_recomputes_instead_of_saving(monkeypatch, one_thread):
    """activation_memory_budget < 1: the compiled step saves less for its backward and trains
    the same (recomputing gives the same values). aot_eager_decomp_partition partitions like
    inductor (the min-cut partitioner, which reads the budget), without generating code."""
    monkeypatch.setattr(harness.measure, "compile_model", lambda m: (
        torch._dynamo.reset(), torch.compile(m, backend="aot_eager_decomp_partition"))[1])
    spec = parse_model_spec("longvq[key_grad=window]")
    saved, losses = {}, {}
    for budget in (1.0, 0.5):
        config = spec.entry.make_config(d_model=32, n_layers=2, n_heads=2, d_ffn=64,
                                        activation_memory_budget=budget,
                                        **dict(spec.overrides))
        cell = EfficiencyCell(spec.label, 128, 2, "cpu", "fp32", seed=3, warmup=1,
                              compile=True)
        saved[budget] = account_cell(spec.entry, config, cell).saved_bytes
        step = harness.measure.build_step(spec.entry, config, cell, torch.device("cpu")).step
        losses[budget] = torch.stack([step() for _ in range(2)])
    assert saved[0.5] < 0.8 * saved[1.0], saved
    torch.testing.assert_close(losses[0.5], losses[1.0], rtol=1e-5, atol=1e-6)


def _event(action: str, addr: int, size: int, filename: str, line: int) -> dict:
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "/usr/lib/torch/x.py", "line": 1, "name": "inner"},
                       {"filename": filename, "line": line, "name": "fn"}]}


def test_allocator_trace_replayed_to_its_peak():
    """The blocks alive when the traced allocations peak, by the first frame in the repository
    (or in inductor's generated code): not those freed before, nor those made after."""
    root = "/repo"
    trace = [
        _event("alloc", 1, 100, "/repo/models/a.py", 10),
        _event("alloc", 2, 50, "/tmp/torchinductor_x/cabc.py", 7),
        _event("free_completed", 1, 100, "/repo/models/a.py", 10),
        _event("alloc", 3, 300, "/repo/models/b.py", 20),
        _event("alloc", 4, 20, "/repo/models/b.py", 20),  # the peak: 50 + 300 + 20
        _event("free_completed", 3, 300, "/repo/models/b.py", 20),
        _event("alloc", 5, 200, "/elsewhere/lib.py", 3),  # after the peak (220 + 50 < 370)
        {"action": "free_completed", "addr": 99, "size": 8, "frames": []},  # made before
    ]
    live = live_at_peak(trace, root)
    assert live == {"b.py:20 fn": 320, "cabc.py:7 fn": 50}
    account = MemoryAccount(1, 1, 2, [], None, cuda_resident=10, cuda_step_peak=400,
                            cuda_peak_live=live)
    tables = memory_tables(account, "c", top=1)
    peak_table = next(t for t in tables if t.header[0] == "allocated at")
    assert peak_table.rows == [["b.py:20 fn", "0.0"]] and "370" not in peak_table.caption
    assert "1 of 2 places" in peak_table.caption


def test_memory_flag_writes_tables(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    code = main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--memory", "longvq", "--profile-top", "4", "--out", str(out),
                 "--store", str(tmp_path / "b.db")])
    assert code == 0
    rows = pd.read_csv(out / "memory_longvq_L256.csv")
    assert len(rows) > 10 and (rows["storage_bytes"] >= rows["tensor_bytes"]).all()
    markdown = (out / "memory_longvq_L256.md").read_text()
    assert "saved for backward: the storages they keep alive" in markdown
    assert "blocks.0.memory" in markdown  # eager: by module
    assert "the 4 largest saved storages" in markdown
    assert "memory longvq" in capsys.readouterr().out
    assert not (tmp_path / "b.db").exists()


def test_file_names_keep_a_label_with_a_decimal_point(tmp_path):
    from harness.commands.efficiency import safe_name
    from harness.report_efficiency import write_profile_files

    stem = f"memory_{safe_name('longvq[activation_memory_budget=0.5]')}_L256"
    paths = write_profile_files([{"a": 1}], [], tmp_path / stem)
    assert sorted(p.name for p in paths) == [f"{stem}.csv", f"{stem}.md"]
    assert all(p.exists() for p in paths)


@pytest.mark.parametrize("argv, message", [
    (["--memory", "longvqq"], "longvq"),
    (["--memory", "longvq", "--profile", "longvq"], "--profile and --memory"),
])
def test_memory_flag_errors(tmp_path, capsys, argv, message):
    code = main(["efficiency", "--preset", "paper-text4k", "--quick", "--device", "cpu",
                 "--store", str(tmp_path / "b.db"), *argv])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_account_has_the_allocator_peak_and_what_is_alive_there():
    spec = parse_model_spec("longvq[key_grad=window]")
    config = spec.entry.make_config(d_model=64, n_layers=2, n_heads=2, d_ffn=128,
                                    **dict(spec.overrides))
    account = account_cell(spec.entry, config,
                           EfficiencyCell(spec.label, 1024, 4, "cuda", "bf16", warmup=2))
    assert account.cuda_resident is not None and account.cuda_step_peak is not None
    assert account.cuda_step_peak > account.cuda_resident
    live = account.cuda_peak_live
    assert live and sum(live.values()) <= account.cuda_step_peak
    # the step's activations were allocated in this repository's code or inductor's
    assert any(not where.startswith("elsewhere") for where in live)
    assert account.saved_bytes <= account.cuda_step_peak
