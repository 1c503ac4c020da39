"""The causal cache-sums kernel compiled for sm_90a on CPU at #9's shape, every config:
registers, spills, SASS instruction count and the tensor-core (HGMMA) instructions."""
import re
from models.vq_attention import triton as vq_triton
from tests.triton_codegen import compile_kernel

values = dict(D=64, DV=64, BLOCK_D=64, BLOCK_DV=64, IS_SOFTMAX=True, CAUSAL=True, MODE=0,
              HAS_BIAS=True, PREC="tf32")
for i, config in enumerate(vq_triton.CONFIGS["sums"]):
    code = compile_kernel("sums", values, config)
    sass = code.sass
    instrs = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", l)]
    def count(op):
        return sum(1 for l in instrs if re.search(r"\b" + op, l))
    print(f"{i}: {config.kwargs} w{config.num_warps} s{config.num_stages}: regs {code.registers}"
          f" spill {code.spill_bytes} shared {code.shared_bytes} instrs {len(instrs)}"
          f" HGMMA {count('HGMMA')} ATOMS {count('ATOMS')} SHFL {count('SHFL')}"
          f" BAR {count('BAR')} STS {count('STS')} LDS {count('LDS')}")
