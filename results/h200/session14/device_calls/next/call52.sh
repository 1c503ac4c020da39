#!/usr/bin/env bash
# session 19: the cache sums split to fill the SMs. call51's sums4/sums8 ran one segment, as
# base did (256 programs >= 132 SMs stopped the split), and its chunk256 read the same sums time
# with half the entries: the walk is latency-bound. _fill_segments now splits until
# SUMS_PROGRAMS_PER_SM programs per SM. 1. the VQ-attention GPU tests (every config, and the
# split cache at B H = 64); 2. fwd_ablation at 32K with 1 (session 18's split), 2 (the default),
# 4, 8 and 16 programs per SM, and fwd+bwd; 3. #9's full table with the fastest of them (set
# through a wrapper, named in the rows' commit). TOTAL (s, default 400) caps the call.
TOTAL_DEFAULT=400
source .gpu-runs/common.sh
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 $(cap 130) python -c "import sys, pytest; sys.exit(pytest.main(['-q', '-rfs', '-p', 'no:cacheprovider', '--durations=5'] + open(sys.argv[1]).read().splitlines()))" $W/shard$i.txt > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests ($(wc -l < $W/gpu_tests.txt) ids)" >> $W/times.txt
for i in 0 1 2 3 4 5; do echo "shard$i: $(grep -E '[0-9]+ (passed|failed|error)' $W/pytest_shard$i.log | tail -1)"; done > $W/pytest_summary.txt
grep -h -E '^(FAILED|ERROR)' $W/pytest_shard*.log >> $W/pytest_summary.txt
unset LONGVQ_TRITON_AUTOTUNE
[ $(left) -ge 40 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 90) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label split --variants sums1,sums2,sums4,sums8,sums16,fwd+bwd > $W/fwd_ablation.log 2>&1
BEST=$(python -c "
import json
rows = [json.loads(l) for l in open('$W/fwd_ablation/fwd_ablation.jsonl') if l.strip()]
rows = [r for r in rows if r['variant'].startswith('sums')]
print(min(rows, key=lambda r: r['ms'])['sums_per_sm'] if rows else 2)" 2>/dev/null || echo 2)
echo "fastest SUMS_PROGRAMS_PER_SM: $BEST" >> $W/times.txt
KB="kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
[ $(left) -ge 60 ] && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)+sums_per_sm=$BEST" t timeout -k 5 $(( $(left) - 3 )) python -c "
import runpy, sys
import models.vq_attention.triton as vq_triton
vq_triton.SUMS_PROGRAMS_PER_SM = int(sys.argv[1])
sys.argv = ['run_bench.py'] + sys.argv[2:]
runpy.run_path('run_bench.py', run_name='__main__')" $BEST $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window,linear-window,sdpa-flash,fla-linear --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
