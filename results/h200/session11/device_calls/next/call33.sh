#!/usr/bin/env bash
# staged in session 11: #7 in one run at the session's final commit (as session 10's call28):
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
LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 70 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models mamba --set concurrent_directions=false --store $W/mamba_sequential.db --out $W/mamba-sequential > $W/mamba-sequential.log 2>&1
left=$(( 540 - ($(date +%s) - T0) ))
echo "left for the GPU tests: $left s" >> $W/times.txt
[ "$left" -ge 30 ] || exit 0  # call31 runs every GPU test; these are a repeat at the final commit
python -m pytest --collect-only -q -m gpu tests 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 $left python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
tail -n 2 $W/pytest_shard*.log > $W/pytest_summary.txt
