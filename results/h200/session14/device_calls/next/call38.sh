#!/usr/bin/env bash
# session 16 (staged, no GPU lent): issue #9 at 32K after the flat cache-sums loop (e0fb42a) and
# the sm_90a code-generation fixes (af995fa, 88e8dcb). call34 (in call36) has tested the new
# configs; call39 tests every config.
# 1. the #9 table (16K, 32K; fwd and fwd+bwd; Triton window and SDPA; the torch linear path's
#    322 ms cells are left out: its >= 3x was met in session 8), autotuned;
# 2. fwd_ablation.py: the 32K forward's kernels and the variants that each drop one part of
#    its work, every autotune config's time (TRITON_CACHE_AUTOTUNING=0: tuned afresh);
# 3. A/Bs, each in a copy of the tree with one patch reverted (the autotune configs are the
#    same in all trees): flat_sums.patch (the nested entry/tile loop; base, fwd+bwd) and
#    codegen.patch (the bias branch, the unaligned codebook offset, dk/dv's branch, the first
#    configs at Dv > 128; base, codes-only, fwd+bwd).
# TOTAL (s, default 545) caps the call; ABL_VARIANTS / AB_VARIANTS (comma lists) shorten the
# as-is ablation and the codegen A/B.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
unset LONGVQ_TRITON_AUTOTUNE
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
left() { echo $(( ${TOTAL:-545} - ($(date +%s) - T0) )); }
[ $(left) -ge 60 ] && t timeout -k 5 $(( $(left) < 120 ? $(left) : 120 )) $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 60 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(( $(left) < 200 ? $(left) : 200 )) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is ${ABL_VARIANTS:+--variants $ABL_VARIANTS} > $W/fwd_ablation.log 2>&1
rm -rf /tmp/bs && cp -r . /tmp/bs && (cd /tmp/bs && patch -p1 -R < .gpu-runs/flat_sums.patch > $W/patch_bs.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bs && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-nested-sums" PYTHONPATH=/tmp/bs TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(( $(left) < 90 ? $(left) : 90 )) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label nested-sums --variants base,fwd+bwd > $W/fwd_ablation_nested.log 2>&1)
rm -rf /tmp/bc && cp -r . /tmp/bc && (cd /tmp/bc && patch -p1 -R < .gpu-runs/codegen.patch > $W/patch_bc.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bc && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-codegen" PYTHONPATH=/tmp/bc TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(( $(left) < 120 ? $(left) : 120 )) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label without-codegen --variants ${AB_VARIANTS:-base,codes-only,fwd+bwd} > $W/fwd_ablation_nocodegen.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
