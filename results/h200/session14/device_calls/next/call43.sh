#!/usr/bin/env bash
# session 17: call38 without its #9 table (call42 runs it): the 32K forward taken apart
# (fwd_ablation.py, as is), then the A/Bs of session 16's kernel changes, each in a copy of the
# tree with one patch reverted: flat_sums.patch (nested cache-sums loop) and codegen.patch.
# TOTAL (s, default 420) caps it; ABL_VARIANTS / AB_VARIANTS shorten the variant lists.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
unset LONGVQ_TRITON_AUTOTUNE
left() { echo $(( ${TOTAL:-420} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
[ $(left) -ge 60 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 170) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants ${ABL_VARIANTS:-base,codes-only,sdpa-256keys,S64,fwd+bwd} > $W/fwd_ablation.log 2>&1
rm -rf /tmp/bs && cp -r . /tmp/bs && (cd /tmp/bs && patch -p1 -R < .gpu-runs/flat_sums.patch > $W/patch_bs.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bs && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-nested-sums" PYTHONPATH=/tmp/bs TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 90) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label nested-sums --variants base,fwd+bwd > $W/fwd_ablation_nested.log 2>&1)
rm -rf /tmp/bc && cp -r . /tmp/bc && (cd /tmp/bc && patch -p1 -R < .gpu-runs/codegen.patch > $W/patch_bc.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bc && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-codegen" PYTHONPATH=/tmp/bc TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 120) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label without-codegen --variants ${AB_VARIANTS:-base,codes-only,fwd+bwd} > $W/fwd_ablation_nocodegen.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
