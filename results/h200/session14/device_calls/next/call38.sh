#!/usr/bin/env bash
# session 16 (staged, no GPU lent): issue #9 at 32K after the flat cache-sums loop (e0fb42a).
# 1. every autotune config of every VQ-attention kernel alone against the oracle (6 shards,
#    120 s cap: $1);
# 2. the #9 table (16K, 32K; fwd and fwd+bwd; Triton window and SDPA; the torch linear path's
#    322 ms cells are left out: its >= 3x was met in session 8), autotuned;
# 3. fwd_ablation.py: the 32K forward's kernels and the variants that each drop one part of
#    its work, every autotune config's time (TRITON_CACHE_AUTOTUNING=0: tuned afresh);
# 4. its A/B: the same (base, fwd+bwd) in a copy of the tree with flat_sums.patch reverted
#    (the nested entry/tile loop; the autotune configs are the same in both trees).
# TOTAL (s, default 545) caps the call.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
export LONGVQ_TRITON_AUTOTUNE=0
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py -k every_config 2>/dev/null | grep '::' > $W/config_tests.txt
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  awk -v i=$i 'NR%6==i' $W/config_tests.txt > $W/cshard$i.txt
  timeout -k 5 ${1:-120} python -c "import sys, pytest; sys.exit(pytest.main(['-q', '-rfs', '-p', 'no:cacheprovider', '--durations=0'] + open(sys.argv[1]).read().splitlines()))" $W/cshard$i.txt > $W/pytest_cshard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: every-config tests" >> $W/times.txt
for i in 0 1 2 3 4 5; do echo "cshard$i: $(grep -E '[0-9]+ (passed|failed|error)' $W/pytest_cshard$i.log | tail -1)"; done > $W/pytest_config_summary.txt
grep -h -E '^(FAILED|ERROR)' $W/pytest_cshard*.log >> $W/pytest_config_summary.txt
unset LONGVQ_TRITON_AUTOTUNE
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
left() { echo $(( ${TOTAL:-545} - ($(date +%s) - T0) )); }
[ $(left) -ge 60 ] && t timeout -k 5 $(( $(left) < 120 ? $(left) : 120 )) $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 60 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(( $(left) < 240 ? $(left) : 240 )) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is > $W/fwd_ablation.log 2>&1
rm -rf /tmp/bs && cp -r . /tmp/bs && (cd /tmp/bs && patch -p1 -R < .gpu-runs/flat_sums.patch > $W/patch_bs.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bs && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-nested-sums" PYTHONPATH=/tmp/bs TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(( $(left) < 90 ? $(left) : 90 )) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label nested-sums --variants base,fwd+bwd > $W/fwd_ablation_nested.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
