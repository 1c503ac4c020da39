#!/usr/bin/env bash
# session 14: every GPU test (call31 lost them: node ids with spaces were split by the shell).
# Node ids are read from files by pytest.main; mamba2's tests (~110 s of first-call Triton
# compile) share one shard, the rest round-robin over 9 more
source .gpu-runs/common.sh
export LONGVQ_TRITON_AUTOTUNE=0
nvidia-smi > $W/nvidia-smi.txt
# (session 16: of the ~50 every-config tests only the configs new in session 16 run here, before
# call36's autotuned table may pick them; call39 runs them all)
python -m pytest --collect-only -q -m gpu tests 2>/dev/null | grep '::' | grep -v every_config > $W/gpu_tests.txt
python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py -k every_config 2>/dev/null | grep -E '\[(fwd-7|sums-5|sums-6|seg_sums-5|seg_sums-6|far_sums-5|far_sums-6|dkdv-6)\]' >> $W/gpu_tests.txt
grep 'mamba2' $W/gpu_tests.txt > $W/shard9.txt
grep -v 'mamba2' $W/gpu_tests.txt > $W/rest.txt
for i in 0 1 2 3 4 5 6 7 8; do awk -v i=$i 'NR%9==i' $W/rest.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5 6 7 8 9; do
  timeout -k 5 ${1:-280} python -c "import sys, pytest; sys.exit(pytest.main(['-q', '-rfs', '-p', 'no:cacheprovider', '--durations=0'] + open(sys.argv[1]).read().splitlines()))" $W/shard$i.txt > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
for i in 0 1 2 3 4 5 6 7 8 9; do echo "shard$i: $(grep -E '[0-9]+ (passed|failed|error)' $W/pytest_shard$i.log | tail -1)"; done > $W/pytest_summary.txt
grep -h -E '^(FAILED|ERROR)' $W/pytest_shard*.log >> $W/pytest_summary.txt
