#!/usr/bin/env bash
# session 14 (call33 of session 11, less its GPU tests: call34 runs them): #7 in one run at the session's final commit (as session 10's call28):
# Text-4K (LongVQ, SDPA, vanilla, and (session 12) each with activation_memory_budget=0.5;
# Triton autotuning on, the default), the lean LongVQ's CUDA --memory, and the growth 8K -> 64K
# (LongVQ, Mamba, linear attention; autotuning off), Mamba's growth again with its directions
# run one after the other (concurrent_directions=false: the A/B of session 11's streams), then
# the GPU tests with the time left
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
T0=$(date +%s)
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
t timeout -k 5 260 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla,longvq[key_grad=window;activation_memory_budget=0.5],transformer_sdpa[activation_memory_budget=0.5],transformer_vanilla[activation_memory_budget=0.5]' --store $W/eff.db --out $W/paper-text4k-cg-autotune > $W/paper-text4k-cg-autotune.log 2>&1
t timeout -k 5 120 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --memory 'longvq[key_grad=window;activation_memory_budget=0.5]' --profile-top 40 --out $W/memory > $W/memory_lean.log 2>&1
LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 160 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],mamba,linear_attn' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
[ $(( $(date +%s) - T0 )) -le 480 ] && LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 70 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models mamba --set concurrent_directions=false --store $W/mamba_sequential.db --out $W/mamba-sequential > $W/mamba-sequential.log 2>&1
