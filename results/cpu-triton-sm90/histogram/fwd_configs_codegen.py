"""The forward kernel compiled for sm_90a on CPU at #9's shape (bf16, causal, bias, D = Dv = 64) for the autotuned\nconfig (128 x 32 x 32, 4 warps, 3 stages), its 4-stage variant and the candidates of fwd_configs.patch: registers,\nspills, shared memory, SASS instructions, HGMMA and MUFU.EX2 counts, pipelined and waited loads. From the repository\nroot: PYTHONPATH=. python THIS."""
import re, triton
from tests.triton_codegen import compile_kernel
values = dict(D=64, DV=64, BLOCK_D=64, BLOCK_DV=64, IS_SOFTMAX=True, CAUSAL=True, MODE=0, HAS_BIAS=True, PREC="tf32")
cands = [({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_S": 32}, 4, 3), ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_S": 32}, 4, 4),
         ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_S": 32}, 8, 3), ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_S": 64}, 4, 3),
         ({"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_S": 64}, 8, 3), ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_S": 32}, 8, 3),
         ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_S": 32}, 4, 3), ({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_S": 32}, 4, 3)]
for meta, w, s in cands:
    config = triton.Config(meta, num_warps=w, num_stages=s)
    code = compile_kernel("fwd", values, config)
    instrs = [l for l in code.sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", l)]
    print(meta, w, s, "regs", code.registers, "spill", code.spill_bytes, "shared", code.shared_bytes, "instrs", len(instrs), "HGMMA", sum('HGMMA' in l for l in instrs), "EX2", code.exp2, "pipelined", code.pipelined_loads, "waited", len(code.sync_loads_in_loops))
