"""Which part of a training step a profiled kernel (or CPU operator) belongs to.

A profile's top-N table answers "which kernel is slowest"; the per-category totals answer "where
does the step go" (the VQ attention kernels vs the FFTs vs the optimizer vs ATen's elementwise
glue), which is what decides the next optimisation. Rules are tried in order on the kernel's name;
the first that matches names the category.
"""

from __future__ import annotations

import re

# (category, pattern): searched case-insensitively in the kernel / operator name, first wins
RULES: tuple[tuple[str, str], ...] = (
    # models/vq_attention/triton.py's kernels (_fwd_kernel, ...); on CPU the autograd functions
    ("VQ attention", r"^_\w+_kernel$|VQAttention"),
    ("inductor (fused)", r"^triton_"),  # torch.compile's generated kernels
    ("attention (flash / SDPA)", r"flash|fmha|scaled_dot_product|efficient_attention"),
    ("mamba-ssm / fla", r"selective_scan|causal_conv1d|chunk_|fused_recurrent"),
    ("FFT", r"fft"),
    ("optimizer", r"adam|multi_tensor_apply"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|wgmma|aten::(mm|bmm|addmm|baddbmm|matmul|linear)$"),
    ("normalisation", r"layer_norm|layernorm|gammabeta|rms_norm"),
    ("reduction", r"reduce_kernel|aten::(sum|mean|amax|argmin|argmax)$"),
    ("copy / cast", r"copy|cat_?array|aten::(to|_to_copy|copy_|cat|contiguous|clone)$"),
    ("elementwise (ATen)", r"elementwise|vectorized|aten::(add|sub|mul|div|exp|silu|sigmoid|gelu|"
     r"where|neg|pow|rsqrt|sqrt|erf|lerp|clamp\w*|fill_|zero_|\w+_backward)_?$"),
    ("other ATen operators", r"^aten::"),  # CPU profiles: views, indexing, scatter, ...
)
OTHER = "other"
_COMPILED = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in RULES)


def kernel_category(name: str) -> str:
    """The category of one profiled kernel or operator name (``OTHER`` when no rule matches)."""
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return OTHER


def category_totals(events: list[tuple[str, int, float]], steps: int) -> list[dict]:
    """(name, calls, self µs) of every event -> one row per category: calls (all steps), calls
    per step (kernel launches: a step of many small kernels is bound by their count, not their
    work), ms per step and % of the total, largest first."""
    totals: dict[str, list[float]] = {}
    for name, calls, self_us in events:
        entry = totals.setdefault(kernel_category(name), [0, 0.0])
        entry[0] += calls
        entry[1] += self_us
    grand = sum(us for _, us in totals.values()) or 1.0
    rows = [{"category": category, "calls": int(calls), "calls_per_step": calls / steps,
             "self_ms_per_step": us / 1e3 / steps, "self_pct": 100.0 * us / grand}
            for category, (calls, us) in totals.items()]
    return sorted(rows, key=lambda row: row["self_ms_per_step"], reverse=True)
