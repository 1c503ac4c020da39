#!/usr/bin/env bash
# staged in session 7 for the next session's first device call: GPU tests at the final commit
# (graph-memory bound, _value_dots fold, SDPA recompile fix), then the profiles call16 lost
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
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 60"
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 60 $P --profile 'longvq[key_grad=window]' --lengths 65536 --batch 1 --out $W/prof64k > $W/prof64k.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 60 $P --profile 'longvq[key_grad=window]' --lengths 8192 --batch 8 --out $W/prof8k > $W/prof8k.log 2>&1
t timeout 60 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
t timeout 60 $P --profile transformer_sdpa --lengths 4096 --batch 8 --out $W/prof4k_sdpa > $W/prof4k_sdpa.log 2>&1
