#!/usr/bin/env bash
# session 18: after two kernel changes found from call45's ablation (the cache-sums kernels'
# counts as a dot with ones instead of a row sum: ~300 warp shuffles and 60 registers fewer on
# sm_90a; the forward's softmax in exp2 with log2(e) folded into the scale: half its FMULs):
# 1. the VQ-attention GPU tests, every autotune config of every kernel included (correctness
#    before any speed); 2. fwd_ablation as is and with counts_exp2.patch reverted (the A/B, same
#    machine); 3. #9's table; 4. the 14 scaling-sweep cells call45 did not reach (the
#    [key_grad=window] variants). TOTAL (s, default 560) caps the call.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
# 1. tests, 6 shards in parallel (LONGVQ_TRITON_AUTOTUNE=0: each config is named by the test)
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 ${TEST_CAP:-170} python -c "import sys, pytest; sys.exit(pytest.main(['-q', '-rfs', '-p', 'no:cacheprovider', '--durations=5'] + open(sys.argv[1]).read().splitlines()))" $W/shard$i.txt > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests ($(wc -l < $W/gpu_tests.txt) ids)" >> $W/times.txt
for i in 0 1 2 3 4 5; do echo "shard$i: $(grep -E '[0-9]+ (passed|failed|error)' $W/pytest_shard$i.log | tail -1)"; done > $W/pytest_summary.txt
grep -h -E '^(FAILED|ERROR)' $W/pytest_shard*.log >> $W/pytest_summary.txt
unset LONGVQ_TRITON_AUTOTUNE
# 2. the A/B: as is, then the same with the patch reverted
[ $(left) -ge 60 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 110) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label counts-exp2 --variants base,no-bias,codes-only,fwd+bwd > $W/fwd_ablation.log 2>&1
rm -rf /tmp/ba && cp -r . /tmp/ba && (cd /tmp/ba && patch -p1 -R < .gpu-runs/counts_exp2.patch > $W/patch_ba.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/ba && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-counts-exp2" PYTHONPATH=/tmp/ba TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 80) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label without-counts-exp2 --variants base,fwd+bwd > $W/fwd_ablation_before.log 2>&1)
# 3. #9's table
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
[ $(left) -ge 50 ] && t timeout -k 5 $(cap 90) $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash,linear-window --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
# 4. the sweep cells call45 did not reach
[ $(left) -ge 40 ] && t timeout -k 5 $(( $(left) - 5 )) python run_bench.py efficiency --device cuda --preset scaling --models 'longvq[key_grad=window],transformer_vq[key_grad=window]' --store $W/eff.db --out $W/scaling-window > $W/scaling-window.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
