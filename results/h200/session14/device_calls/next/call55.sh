#!/usr/bin/env bash
# session 20, after call54: the tree has call54's winners (forward 64 x 32 x 64 on 3 stages, sums
# 128 x 64 on 4 stages; their every-config tests passed in call54 in a superset tree). The record
# of the commit that lands them: 1. every VQ-attention GPU test; 2. fwd_ablation at 32K (base,
# fwd+bwd); 3. #9's whole table (Triton, torch linear, SDPA flash, fla).
# TOTAL (s, default 400) caps the call.
TOTAL_DEFAULT=400
source .gpu-runs/common.sh
gpu_tests $PWD $(cap 150)
unset LONGVQ_TRITON_AUTOTUNE
[ $(left) -ge 40 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 50) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants base,fwd+bwd > $W/fwd_ablation.log 2>&1
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
[ $(left) -ge 60 ] && t timeout -k 5 $(( $(left) - 3 )) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window,linear-window,sdpa-flash,fla-linear --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
