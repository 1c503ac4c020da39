#!/usr/bin/env bash
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 150 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,16384,32768,65536 --models 'transformer_sdpa,longvq[key_grad=window]' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile longvq[key_grad=window] --profile-top 60"
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 60 $P --lengths 65536 --batch 1 --out $W/prof64k > $W/prof64k.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 60 $P --lengths 8192 --batch 8 --out $W/prof8k > $W/prof8k.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 60 $P --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
