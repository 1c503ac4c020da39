#!/usr/bin/env bash
# session 14, when device starts were scarce: call34 (every GPU test, 230 s cap) and the #7
# Text-4K table (session 11's call33) in one call, then (session 15) LongVQ without the one-graph
# change, then the lean LongVQ's --memory with the time left; TOTAL (s, default 545) caps the call
T0=$(date +%s)
bash .gpu-runs/call34.sh ${1:-230}
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE  # the table is autotuned (call34's tests ran without)
t timeout -k 5 $(( ${TOTAL:-545} - ($(date +%s) - T0) )) python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla,longvq[key_grad=window;activation_memory_budget=0.5],transformer_sdpa[activation_memory_budget=0.5],transformer_vanilla[activation_memory_budget=0.5]' --store $W/eff.db --out $W/paper-text4k-cg-autotune > $W/paper-text4k-cg-autotune.log 2>&1
# session 15: the A/B of its one-graph change (LongVQ's step traced as one graph: the Triton VQ
# op as custom ops, the codebook snapshot and EMA update before and after the forward), made
# without a GPU: LongVQ in a copy of the tree with one_graph.patch reverted, autotuned like the
# table (TRITON_CACHE_AUTOTUNING: the same kernel configs)
rm -rf /tmp/b0 && cp -r . /tmp/b0 && (cd /tmp/b0 && patch -p1 -R < .gpu-runs/one_graph.patch > $W/patch_b0.log 2>&1)
left=$(( ${TOTAL:-545} - ($(date +%s) - T0) ))
[ "$left" -ge 60 ] && (cd /tmp/b0 && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-one-graph" PYTHONPATH=/tmp/b0 t timeout -k 5 $(( left < 100 ? left : 100 )) python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window]' --store $W/eff_b0.db --out $W/text4k-without-one-graph > $W/text4k-without-one-graph.log 2>&1)
left=$(( ${TOTAL:-545} - ($(date +%s) - T0) ))
[ "$left" -ge 60 ] && t timeout -k 5 $left python run_bench.py efficiency --device cuda --preset paper-text4k --compile --memory 'longvq[key_grad=window;activation_memory_budget=0.5]' --profile-top 40 --out $W/memory > $W/memory_lean.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
