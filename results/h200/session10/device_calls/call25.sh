#!/usr/bin/env bash
# staged in session 9: the GPU tests, LongVQ's VQ attention vs the query chunk (and "all keys" forward), the
# memory breakdown of compiled LongVQ and SDPA at Text-4K, a 4K LongVQ profile after the
# readout fix, Text-4K LongVQ vs SDPA both autotuned in one run
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
# the GPU tests first: session 9's last commits (FFT conv as custom ops, one mx projection, the
# compiled chunked threshold) were CPU-tested only
python -m pytest --collect-only -q -m gpu tests 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 200 python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
export LONGVQ_TRITON_AUTOTUNE=0
t timeout -k 5 60 python .gpu-runs/vq_chunk_bench.py 4096 65536 > $W/vq_chunk_bench.log 2>&1
t timeout -k 5 60 python .gpu-runs/mem_breakdown.py 'longvq[key_grad=window]' 4096 8 > $W/mem_longvq.log 2>&1
t timeout -k 5 45 python .gpu-runs/mem_breakdown.py transformer_sdpa 4096 8 > $W/mem_sdpa.log 2>&1
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 60"
t timeout -k 5 70 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
unset LONGVQ_TRITON_AUTOTUNE
t timeout -k 5 200 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa,transformer_vanilla' --store $W/eff.db --out $W/paper-text4k-cg-autotune > $W/paper-text4k-cg-autotune.log 2>&1
