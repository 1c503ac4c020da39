# sourced by every call script: the commit the rows record, imports from the checkout,
# the output folder, and t CMD..., which runs CMD and appends its seconds to times.txt
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
# session 18: the call's clock (T0, the device's nvidia-smi), the seconds left of TOTAL (default
# TOTAL_DEFAULT, else 560) and cap N = min(N, left), for the calls from call48 on
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt 2>/dev/null
left() { echo $(( ${TOTAL:-${TOTAL_DEFAULT:-560}} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
# session 19: gpu_tests DIR CAP, the VQ-attention GPU tests of the tree DIR (its own imports) in
# 6 parallel shards of at most CAP s each; their summary in pytest_summary.txt
gpu_tests() {
  local dir=$1 cap=$2 s i
  s=$(date +%s)
  (cd "$dir" && PYTHONPATH="$dir" python -m pytest --collect-only -q -m gpu tests/test_vq_attention_triton.py 2>/dev/null | grep '::' > $W/gpu_tests.txt)
  for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
  for i in 0 1 2 3 4 5; do
    (cd "$dir" && PYTHONPATH="$dir" LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 "$cap" python -c "import sys, pytest; sys.exit(pytest.main(['-q', '-rfs', '-p', 'no:cacheprovider', '--durations=5'] + open(sys.argv[1]).read().splitlines()))" $W/shard$i.txt > $W/pytest_shard$i.log 2>&1) &
  done
  wait
  echo "$(( $(date +%s)-s )) s: gpu tests in $dir ($(wc -l < $W/gpu_tests.txt) ids)" >> $W/times.txt
  for i in 0 1 2 3 4 5; do echo "shard$i: $(grep -E '[0-9]+ (passed|failed|error)' $W/pytest_shard$i.log | tail -1)"; done > $W/pytest_summary.txt
  grep -h -E '^(FAILED|ERROR)' $W/pytest_shard*.log >> $W/pytest_summary.txt
}
