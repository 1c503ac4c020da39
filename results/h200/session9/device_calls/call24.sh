#!/usr/bin/env bash
# session 9's final call: all GPU tests; #7 in one run: Text-4K (LongVQ, SDPA, vanilla) and the
# growth 8K -> 64K (LongVQ with conv=auto, Mamba, linear attention); LongVQ chunked at 16K / 32K
# (for CHUNKED_MIN_LENGTH); Text-4K LongVQ with Triton autotuning on (the default) if time is left
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
T0=$(date +%s)
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
t timeout -k 5 120 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla' --store $W/eff.db --out $W/paper-text4k-cg > $W/paper-text4k-cg.log 2>&1
t timeout -k 5 170 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],mamba,linear_attn' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
t timeout -k 5 75 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 16384,32768 --models 'longvq[key_grad=window;ssm_conv=chunked]' --store $W/eff.db --out $W/scaling-chunked-cg > $W/scaling-chunked-cg.log 2>&1
left=$(( 535 - ($(date +%s) - T0) ))
echo "left for the autotuned cell: $left s" >> $W/times.txt
if [ $left -gt 40 ]; then
  unset LONGVQ_TRITON_AUTOTUNE
  t timeout -k 5 $left python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window]' --store $W/eff_autotune.db --out $W/paper-text4k-cg-autotune > $W/paper-text4k-cg-autotune.log 2>&1
fi
