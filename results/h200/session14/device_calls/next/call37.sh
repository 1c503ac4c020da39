#!/usr/bin/env bash
# session 14 (staged): the rest of session 11's call33 after call36: the growth 8K -> 64K (LongVQ, Mamba,
# linear attention; autotuning off), Mamba's growth with its directions one after the other
# (concurrent_directions=false: the A/B of session 11's streams), the lean LongVQ's CUDA
# --memory (if call36 ran out of time before it)
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 160 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],mamba,linear_attn' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 70 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models mamba --set concurrent_directions=false --store $W/mamba_sequential.db --out $W/mamba-sequential > $W/mamba-sequential.log 2>&1
t timeout -k 5 120 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --memory 'longvq[key_grad=window;activation_memory_budget=0.5]' --profile-top 40 --out $W/memory > $W/memory_lean.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
