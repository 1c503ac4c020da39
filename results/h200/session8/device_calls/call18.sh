#!/usr/bin/env bash
# session 8, call 18: S4D conv fft vs chunked micro-bench; Mamba profiles 8K x8 / 64K x1; LongVQ 4K profile
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
export LONGVQ_TRITON_AUTOTUNE=0
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
t timeout -k 5 150 python .gpu-runs/s4d_conv_bench.py > $W/s4d_conv_bench.log 2>&1
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 60"
t timeout -k 5 75 $P --profile mamba --lengths 8192 --batch 8 --out $W/mamba8k > $W/mamba8k.log 2>&1
t timeout -k 5 75 $P --profile mamba --lengths 65536 --batch 1 --out $W/mamba64k > $W/mamba64k.log 2>&1
t timeout -k 5 75 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
