#!/usr/bin/env bash
# session 8, call 20: S4D kernel compiled (real arithmetic) + hand-written FFT-conv backward:
# GPU tests touching them, Text-4K and 8K/64K rows; #9 same-run kernels at 16K/32K
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
export LONGVQ_TRITON_AUTOTUNE=0
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
t timeout -k 5 90 python -m pytest -q -rfs -p no:cacheprovider tests/test_fft_conv.py tests/test_gpu_longvq.py -k "fft_conv or compiled" > $W/pytest.log 2>&1
t timeout -k 5 150 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla' --store $W/eff.db --out $W/paper-text4k-cg > $W/paper-text4k-cg.log 2>&1
t timeout -k 5 110 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],s4d' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
t timeout -k 5 100 $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,linear,sdpa-flash --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
