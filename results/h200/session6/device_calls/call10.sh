#!/usr/bin/env bash
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py tests/test_gpu_longvq.py 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3; do awk -v i=$i 'NR%4==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout 130 python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
LONGVQ_TRITON_AUTOTUNE=0 timeout 130 python -m pytest -q -p no:cacheprovider tests/test_ssm.py tests/test_models_generic.py -x > $W/pytest_cpu_suites_on_gpu.log 2>&1 &
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
KB="python run_bench.py kernels --device cuda --dtype bf16 --window 64 --codebook-size 256 --dim 64 --warmup 1 --repeats 3 --cell-budget 30"
t timeout 60 $KB --batch 2 --heads 1 --value-dim 256 --lengths 32k --modes fwd,fwd+bwd --impls triton-window --out $W/kernels_longvq_shape > $W/kernels_longvq_shape.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 180 python run_bench.py efficiency --device cuda --preset scaling --models 'transformer_sdpa,longvq[key_grad=window],transformer_vq[key_grad=window],linear_attn' --store $W/eff.db --out $W/scaling > $W/scaling.log 2>&1
t timeout 150 python run_bench.py efficiency --device cuda --preset paper-text4k --models 'transformer_vanilla,transformer_sdpa,longvq[key_grad=window]' --store $W/eff.db --out $W/paper-text4k > $W/paper-text4k.log 2>&1
