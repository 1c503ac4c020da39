#!/usr/bin/env bash
# session 18, after call46: the forward's bias read as 2-D slices of a Toeplitz table
# (bias_table.patch: ~60 registers and a quarter of the instructions fewer on sm_90a) and the
# kernels bench timed with CUDA events back to back. 1. the VQ-attention GPU tests (every
# config); 2. fwd_ablation as is and with bias_table.patch reverted (same machine); 3. #9's
# table with the new timing. TOTAL (s, default 290) caps the call.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
left() { echo $(( ${TOTAL:-290} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 ${TEST_CAP:-140} python -c "import sys, pytest; sys.exit(pytest.main(['-q', '-rfs', '-p', 'no:cacheprovider', '--durations=5'] + open(sys.argv[1]).read().splitlines()))" $W/shard$i.txt > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests ($(wc -l < $W/gpu_tests.txt) ids)" >> $W/times.txt
for i in 0 1 2 3 4 5; do echo "shard$i: $(grep -E '[0-9]+ (passed|failed|error)' $W/pytest_shard$i.log | tail -1)"; done > $W/pytest_summary.txt
grep -h -E '^(FAILED|ERROR)' $W/pytest_shard*.log >> $W/pytest_summary.txt
unset LONGVQ_TRITON_AUTOTUNE
[ $(left) -ge 40 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 60) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label bias-table --variants base,fwd+bwd > $W/fwd_ablation.log 2>&1
rm -rf /tmp/bb && cp -r . /tmp/bb && (cd /tmp/bb && patch -p1 -R < .gpu-runs/bias_table.patch > $W/patch_bb.log 2>&1)
[ $(left) -ge 30 ] && (cd /tmp/bb && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-bias-table" PYTHONPATH=/tmp/bb TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 40) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label without-bias-table --variants base > $W/fwd_ablation_before.log 2>&1)
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
[ $(left) -ge 30 ] && t timeout -k 5 $(( $(left) - 3 )) $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash,linear-window --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
