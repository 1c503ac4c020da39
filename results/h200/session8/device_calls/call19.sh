#!/usr/bin/env bash
# session 8, call 19: FFT conv hand-written backward: GPU test, S4D micro-bench, Text-4K + 8K/64K rows
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
export LONGVQ_TRITON_AUTOTUNE=0
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
t timeout -k 5 60 python -m pytest -q -rfs -p no:cacheprovider tests/test_fft_conv.py > $W/pytest_fft_conv.log 2>&1
t timeout -k 5 60 python .gpu-runs/s4d_fftconv_bench.py > $W/s4d_fftconv_bench.log 2>&1
t timeout -k 5 200 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla' --store $W/eff.db --out $W/paper-text4k-cg > $W/paper-text4k-cg.log 2>&1
t timeout -k 5 150 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],s4d' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 60"
t timeout -k 5 70 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
