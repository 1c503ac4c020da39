"""Running Triton kernels under the interpreter from pytest, shared by the kernel tests.

TRITON_INTERPRET=1 must be set before triton is first imported (its own jit helpers, e.g.
tl.zeros, are decorated then), so a test module runs all its interpreter cases in ONE
subprocess (``python -m tests.<module>``, whose ``__main__`` calls ``run_cases``) and its tests
read the errors that subprocess prints (``interpreter_results``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

MARKER = "INTERPRETER_RESULTS "


def patch_interpreter() -> None:
    """Triton 3.6's interpreter converts a scalar of shape (1,) with int(), which numpy >= 2.4
    rejects (triton-lang/triton#9171, "only 0-dimensional arrays can be converted"); its fix."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    import triton.runtime.interpreter as interpreter

    if getattr(interpreter, "_longvq_patched", False):
        return
    interpreter._longvq_patched = True
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


def run_cases(jobs: dict[str, Callable[[], dict[str, float]]]) -> None:
    """In the subprocess: run every case, print one line of {case id: errors or traceback}."""
    patch_interpreter()
    results = {}
    for case_id, job in jobs.items():
        try:
            results[case_id] = job()
        except Exception:  # noqa: BLE001 - reported by the test of this case
            results[case_id] = {"error": traceback.format_exc()}
    print(MARKER + json.dumps(results))


def interpreter_results(module: str, timeout: int) -> dict:
    """In pytest: run ``python -m module`` under the interpreter and return its results."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", module], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line.removeprefix(MARKER))
    pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def check_result(results: dict, case_id: str, tol: float) -> None:
    """Every error of one case within ``tol`` (a traceback fails the test with it)."""
    errors = results[case_id]
    if "error" in errors:
        pytest.fail(errors["error"])
    print(errors)
    for name, error in errors.items():
        assert error <= tol, f"{case_id} {name}: relative error {error:.2e} > {tol}"
