#!/usr/bin/env bash
# session 19: call48's first half and call49 in one call (a start costs ~150 s of held time):
# #9's full kernel table L = 1K..64K with the fixed timing (CUDA events around calls run back to
# back, never right after an autotuning call), fla included; fwd_ablation at 32K with sums4/sums8
# (more cache-sums segments) and chunk256; then #7's LongVQ[key_grad=window] and SDPA at 32K and
# 64K of the scaling preset, compiled with CUDA graphs (eager LongVQ is host-bound: 1.32x SDPA at
# 32K in session 18's sweep). The precompile A/B and dq_8warps stay in call48.
# TOTAL (s, default 560) caps the call.
TOTAL_DEFAULT=560
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
t timeout -k 5 $(cap 200) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window,linear-window,sdpa-flash,fla-linear --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 30 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 110) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants base,fwd+bwd,sums4,sums8,chunk256,no-bias > $W/fwd_ablation.log 2>&1
[ $(left) -ge 60 ] && t timeout -k 5 $(( $(left) - 5 )) python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 32768,65536 --models 'longvq[key_grad=window],transformer_sdpa' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
