#!/usr/bin/env bash
# session 17, after the fix of the failing compiled test (models/vq.py: no sum of a tensor of
# ones, which inductor made a constant reduction Triton 3.6 cannot compile for sm_90): every GPU
# test (call34, capped), then the #9 table and the growth 8K -> 64K of call41. TOTAL caps it.
T0=$(date +%s)
left() { echo $(( ${TOTAL:-540} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
bash .gpu-runs/call34.sh ${1:-220}
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
[ $(left) -ge 60 ] && t timeout -k 5 $(cap 90) $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash,linear-window --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 60 ] && LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 $(cap 170) python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],mamba,linear_attn' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
