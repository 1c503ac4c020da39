#!/usr/bin/env bash
# session 18: #7's "LongVQ >= 3x SDPA at 32K and completes 64K" on the H100, compiled with CUDA
# graphs (eager LongVQ is host-bound at ~30 ms a step at every L: 1.32x SDPA at 32K in call45/46's
# sweep; compiled it was met on the H200 in session 9): the scaling preset's cells at 4K, 32K
# and 64K for LongVQ[key_grad=window] and SDPA, autotuned. TOTAL (s, default 300) caps the call.
TOTAL_DEFAULT=300
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE
t timeout -k 5 $(( $(left) - 5 )) python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 4096,32768,65536 --models 'longvq[key_grad=window],transformer_sdpa' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
