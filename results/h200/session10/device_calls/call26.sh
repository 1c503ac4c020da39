#!/usr/bin/env bash
# session 10: the bidirectional "far" cache as totals less each chunk's band (no prefix/suffix
# passes, no scans): GPU tests, A/B of the op vs session 9's kernels, a 4K profile, Text-4K
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD:$PWD/.gpu-runs
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
python -m pytest --collect-only -q -m gpu tests 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 200 python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
tail -n 2 $W/pytest_shard*.log > $W/pytest_summary.txt
export LONGVQ_TRITON_AUTOTUNE=0
t timeout -k 5 90 python .gpu-runs/vq_far_ab.py 4096 65536 > $W/vq_far_ab.log 2>&1
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 40"
t timeout -k 5 70 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
unset LONGVQ_TRITON_AUTOTUNE
t timeout -k 5 150 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models 'longvq[key_grad=window],transformer_sdpa' --store $W/eff.db --out $W/paper-text4k-cg-autotune > $W/paper-text4k-cg-autotune.log 2>&1
