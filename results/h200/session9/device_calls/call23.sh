#!/usr/bin/env bash
# session 9, call 1 of the session's own: chunked-S4D GPU tests (bf16 products), the S4D layer
# fft vs chunked under autocast 4K..64K, Text-4K LongVQ vs SDPA (readout compiled), compiled
# LongVQ fft vs chunked 8K..64K (to set CHUNKED_MIN_LENGTH)
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
export LONGVQ_TRITON_AUTOTUNE=0
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
t timeout -k 5 150 python -m pytest -q -rfs -p no:cacheprovider -m gpu tests/test_s4d_chunked.py "tests/test_gpu_longvq.py::test_compiled_graphed_step_trains_like_eager_steps" > $W/pytest.log 2>&1
t timeout -k 5 60 python .gpu-runs/s4d_conv_bench4.py 8x4096 8x8192 4x16384 2x32768 1x65536 > $W/s4d_conv_bench4.log 2>&1
t timeout -k 5 100 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa' --store $W/eff.db --out $W/paper-text4k-cg > $W/paper-text4k-cg.log 2>&1
t timeout -k 5 160 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,16384,32768,65536 --models 'longvq[key_grad=window;ssm_conv=fft],longvq[key_grad=window;ssm_conv=chunked]' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
