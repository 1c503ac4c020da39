#!/usr/bin/env bash
# session 16 (staged, no GPU lent): every autotune config of every VQ-attention kernel alone
# against the oracle (6 shards, $1 s cap, default 120), then the Text-4K A/B of this session's
# sm_90a code-generation fixes (codegen.patch reverted in a copy of the tree): LongVQ autotuned,
# as is and without, and without the forward's 256-wide value tile (fwd_value_tile.patch); then
# with autotuning off (where the Dv > 128 defaults apply), as is and without codegen.patch.
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
left() { echo $(( ${TOTAL:-545} - ($(date +%s) - T0) )); }
M="--device cuda --preset paper-text4k --compile --cuda-graph"
rm -rf /tmp/bc && cp -r . /tmp/bc && (cd /tmp/bc && patch -p1 -R < .gpu-runs/codegen.patch > $W/patch_bc.log 2>&1)
rm -rf /tmp/bv && cp -r . /tmp/bv && (cd /tmp/bv && patch -p1 -R < .gpu-runs/fwd_value_tile.patch > $W/patch_bv.log 2>&1)
for tune in 1 0; do
  [ $(left) -ge 60 ] && LONGVQ_TRITON_AUTOTUNE=$tune t timeout -k 5 $(( $(left) < 100 ? $(left) : 100 )) python run_bench.py efficiency $M --models 'longvq[key_grad=window]' --store $W/eff_codegen.db --out $W/text4k-autotune$tune > $W/text4k-autotune$tune.log 2>&1
  [ $(left) -ge 60 ] && (cd /tmp/bc && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-codegen" PYTHONPATH=/tmp/bc LONGVQ_TRITON_AUTOTUNE=$tune t timeout -k 5 $(( $(left) < 100 ? $(left) : 100 )) python run_bench.py efficiency $M --models 'longvq[key_grad=window]' --store $W/eff_nocodegen.db --out $W/text4k-without-codegen-autotune$tune > $W/text4k-without-codegen-autotune$tune.log 2>&1)
  # the forward's 256-wide value tile (fwd_value_tile.patch), autotuned only
  [ $tune = 1 ] && [ $(left) -ge 60 ] && (cd /tmp/bv && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-fwd-value-tile" PYTHONPATH=/tmp/bv LONGVQ_TRITON_AUTOTUNE=1 t timeout -k 5 $(( $(left) < 100 ? $(left) : 100 )) python run_bench.py efficiency $M --models 'longvq[key_grad=window]' --store $W/eff_nofwdtile.db --out $W/text4k-without-fwd-value-tile > $W/text4k-without-fwd-value-tile.log 2>&1)
done
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
