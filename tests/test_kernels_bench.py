"""`run_bench.py kernels` on CPU: rows per impl/mode/length, the correctness gate (a wrong
implementation is not timed), unavailable kernels reported as such, CSV/markdown/plot output."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import harness.kernels as kernels
from harness.cli import main

SHAPE = kernels.OpShape(batch=1, heads=2, dim=8, value_dim=8, codebook_size=8, window=4,
                        causal=True)


def test_rows_status_growth_and_bandwidth():
    rows = kernels.benchmark(["naive", "linear", "triton", "sdpa-flash", "fla-linear"], [16, 32],
                             SHAPE, "cpu", torch.float32, ("fwd", "fwd+bwd"), warmup=1,
                             repeats=1)
    assert len(rows) == 5 * 2 * 2
    by_impl = {}
    for row in rows:
        by_impl.setdefault(row.impl, []).append(row)
    for impl in ("naive", "linear"):
        assert all(r.status == "ok" and r.ms_median > 0 for r in by_impl[impl])
        assert all(r.rel_err_vs_naive <= 1e-5 for r in by_impl[impl])
        fwd = [r for r in by_impl[impl] if r.mode == "fwd"]
        assert all(r.gbps > 0 and r.bw_frac == r.gbps / kernels.H100_PEAK_GBPS for r in fwd)
        assert fwd[1].growth == pytest.approx(fwd[1].ms_median / fwd[0].ms_median)
        assert all(r.gbps is None for r in by_impl[impl] if r.mode == "fwd+bwd")
    for impl in ("triton", "sdpa-flash", "fla-linear"):  # CUDA kernels on a CPU machine
        assert all(r.status == "unavailable" and r.ms_median is None and r.note
                   for r in by_impl[impl])


def test_wrong_implementation_is_not_timed(monkeypatch):
    real = kernels._vq_fn

    def broken(name):
        fn = real(name)
        if name != "linear":
            return fn

        def off_by_ten_percent(*args, **kwargs):
            return fn(*args, **kwargs) * 1.1

        return off_by_ten_percent

    monkeypatch.setattr(kernels, "_vq_fn", broken)
    timed = []
    monkeypatch.setattr(kernels, "time_op", lambda *a, **k: timed.append(a) or None)
    rows = kernels.benchmark(["linear"], [16, 32], SHAPE, "cpu", torch.float32, ("fwd",))
    assert [r.status for r in rows] == ["wrong", "wrong"] and not timed
    assert rows[0].rel_err_vs_naive == pytest.approx(0.1, rel=1e-3)


def test_min_bytes_formula():
    shape = kernels.OpShape(batch=8, heads=8, dim=64, value_dim=64, codebook_size=256,
                            attn_fn="softmax")
    per_position = (2 * 64 + 2 * 64) * 2 + 8 + 4  # bf16 q, k_hat, v, O; int64 codes; fp32 lse
    assert kernels.min_bytes(shape, 1024, torch.bfloat16) == (
        64 * 1024 * per_position + 8 * 256 * 64 * 2)


def test_cli_writes_outputs_and_rejects_bad_modes(tmp_path, capsys):
    out = tmp_path / "k"
    args = ["kernels", "--impls", "naive,linear,sdpa-flash", "--lengths", "16,32", "--device",
            "cpu", "--dim", "8", "--codebook-size", "8", "--window", "4", "--heads", "2",
            "--modes", "fwd,fwd+bwd", "--warmup", "1", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    frame = pd.read_csv(out / "kernels.csv")
    assert len(frame) == 3 * 2 * 2
    assert set(frame[frame["impl"] == "sdpa-flash"]["status"]) == {"unavailable"}
    assert (out / "kernels.png").stat().st_size > 1000
    assert "GB/s" in (out / "kernels.md").read_text()
    capsys.readouterr()
    assert main([*args[:-2], "--modes", "bwd"]) == 2
    assert "--modes" in capsys.readouterr().err


def test_peak_bandwidth_by_device_name() -> None:
    from harness.kernels import peak_bandwidth_gbps

    assert peak_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert peak_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert peak_bandwidth_gbps("cpu") is None


def test_run_op_backward_of_an_op_without_bias() -> None:
    """sdpa reads no bias: its fwd+bwd call must not fail on the unused bias leaf."""
    shape = kernels.OpShape(batch=1, heads=2, dim=16, value_dim=16, codebook_size=8, window=4,
                            causal=True)
    inputs = kernels._differentiable(kernels._reference_inputs(
        "sdpa-flash", kernels.make_inputs(shape, 32, "cpu", torch.float32, seed=0)))
    assert kernels.run_op("sdpa-flash", inputs, shape, backward=True).shape == (1, 2, 32, 16)


def test_a_failing_cell_is_an_error_row_and_the_run_goes_on(monkeypatch):
    real = kernels.time_op

    def fail_at_32(impl, shape, length, *args, **kwargs):
        if length == 32:
            raise RuntimeError("boom")
        return real(impl, shape, length, *args, **kwargs)

    monkeypatch.setattr(kernels, "time_op", fail_at_32)
    rows = kernels.benchmark(["linear"], [16, 32, 64], SHAPE, "cpu", torch.float32, ("fwd",))
    assert [r.status for r in rows] == ["ok", "error", "ok"]
    assert "RuntimeError: boom" in rows[1].note


def test_cli_no_window(tmp_path, capsys):
    """--window 0 (no local part) runs with --no-bias, each row checked against the oracle;
    without --no-bias, or with a key_grad=window impl named, it stops with the fix."""
    base = ["kernels", "--lengths", "16", "--device", "cpu", "--dim", "8", "--codebook-size", "8",
            "--window", "0", "--heads", "2", "--modes", "fwd,fwd+bwd", "--warmup", "1",
            "--repeats", "1"]
    out = tmp_path / "k"
    assert main([*base, "--no-bias", "--impls", "naive,linear", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "kernels.csv")
    assert set(frame["status"]) == {"ok"} and len(frame) == 4
    assert (frame[frame["impl"] == "linear"]["rel_err_vs_naive"] < 1e-4).all()
    capsys.readouterr()
    assert main([*base, "--impls", "linear"]) == 2
    assert "--no-bias" in capsys.readouterr().err
    assert main([*base, "--no-bias", "--impls", "linear,linear-window"]) == 2
    assert "linear-window" in capsys.readouterr().err
    negative = [("-1" if arg == "0" else arg) for arg in base]
    assert main([*negative, "--no-bias", "--impls", "linear"]) == 2
    assert "--window: -1" in capsys.readouterr().err


def test_cli_quick_defaults(tmp_path):
    """--quick: CPU-sized lengths and repeats unless given (every command takes --quick)."""
    out = tmp_path / "k"
    assert main(["kernels", "--quick", "--impls", "linear", "--device", "cpu", "--dim", "8",
                 "--codebook-size", "8", "--window", "4", "--warmup", "1", "--out",
                 str(out)]) == 0
    assert sorted(pd.read_csv(out / "kernels.csv")["seq_len"]) == [256, 512]
    assert main(["list", "--quick", "--device", "cpu", "--store", str(tmp_path / "x.db")]) == 0


@pytest.mark.parametrize(("slow_calls", "warmup", "calls", "op_is_slow"), [
    (0, 1, 1, False),
    (1, 1, 2, False),  # compile/autotune: one more warm-up call, then the timed ones
    (1, 3, 3, False),
    (2, 1, 2, True),  # the op itself is slow: 2 timed calls
    (5, 3, 2, True),
])
def test_warm_up_never_times_right_after_a_slow_first_call(slow_calls, warmup, calls,
                                                           op_is_slow):
    import time

    made = []

    def call():
        made.append(1)
        if len(made) <= slow_calls:
            time.sleep(0.03)

    assert kernels._warm_up(call, warmup, slow_s=0.02, device="cpu") is op_is_slow
    assert len(made) == calls


def test_cuda_timing_queues_the_calls_back_to_back_between_events(monkeypatch):
    """The CUDA path without a GPU: a stand-in Event logs the order. One untimed call first
    (the host gets ahead), then event, call, event for each timed call, one synchronisation
    at the end; each time is its pair of events' elapsed time."""
    log = []

    class Event:
        count = 0

        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            Event.count += 1
            self.id = Event.count

        def record(self) -> None:
            log.append(f"event{self.id}")

        def elapsed_time(self, end) -> float:
            return float(end.id - self.id)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    times = kernels._timed_calls_cuda(lambda: log.append("call"), repeats=2)
    assert log == ["call", "event1", "call", "event2", "event3", "call", "event4", "sync"]
    assert times == [1.0, 1.0]
