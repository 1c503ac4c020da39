#!/usr/bin/env bash
# session 14, when device starts were scarce: call34 (every GPU test, 230 s cap) and the #7
# Text-4K table (session 11's call33) in one call, then the lean LongVQ's --memory with the time left; TOTAL (s, default 545) caps the call
T0=$(date +%s)
bash .gpu-runs/call34.sh ${1:-230}
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE  # the table is autotuned (call34's tests ran without)
t timeout -k 5 $(( ${TOTAL:-545} - ($(date +%s) - T0) )) python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla,longvq[key_grad=window;activation_memory_budget=0.5],transformer_sdpa[activation_memory_budget=0.5],transformer_vanilla[activation_memory_budget=0.5]' --store $W/eff.db --out $W/paper-text4k-cg-autotune > $W/paper-text4k-cg-autotune.log 2>&1
left=$(( ${TOTAL:-545} - ($(date +%s) - T0) ))
[ "$left" -ge 60 ] && t timeout -k 5 $left python run_bench.py efficiency --device cuda --preset paper-text4k --compile --memory 'longvq[key_grad=window;activation_memory_budget=0.5]' --profile-top 40 --out $W/memory > $W/memory_lean.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
