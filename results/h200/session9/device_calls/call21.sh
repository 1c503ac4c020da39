#!/usr/bin/env bash
# staged in session 8 for the next session's first device call: GPU tests at the final commit
# (compiled quantiser, real-arithmetic S4D kernel, FFT backward, chunked S4D), the S4D layer
# fft vs chunked, Text-4K and 8K/64K rows with both convolutions
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
python -m pytest --collect-only -q -m gpu tests 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 200 python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
export LONGVQ_TRITON_AUTOTUNE=0
t timeout -k 5 60 python .gpu-runs/s4d_conv_bench2.py > $W/s4d_conv_bench2.log 2>&1
t timeout -k 5 150 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],longvq[key_grad=window;ssm_conv=chunked],transformer_sdpa,transformer_vanilla' --store $W/eff.db --out $W/paper-text4k-cg > $W/paper-text4k-cg.log 2>&1
t timeout -k 5 150 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],longvq[key_grad=window;ssm_conv=chunked],s4d,s4d[ssm_conv=chunked]' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
