#!/usr/bin/env bash
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py tests/test_gpu_longvq.py 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout 200 python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 110 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,16384,32768,65536 --models 'longvq[key_grad=window],transformer_sdpa' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 150 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'mamba,linear_attn,transformer_vq[key_grad=window]' --store $W/eff.db --out $W/scaling-cg-growth > $W/scaling-cg-growth.log 2>&1
