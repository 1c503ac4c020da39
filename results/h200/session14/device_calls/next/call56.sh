#!/usr/bin/env bash
# session 20, after call55 (the record of 2f844b4: forward 1.638 ms at 32K, 4.99x the roofline,
# a margin within run-to-run noise). Two candidates, not in the tree: candidate_configs2.patch
# (the 64 x 32 x 64 winner on 2 and 4 stages, 16-key band tiles, 128 codes a tile; 138-255
# registers, no spill on sm_90a) and fma_codes.patch (the forward's code tiles scale inside the
# exponent: one fused multiply-add an element instead of a multiply and a subtraction; sm_90a
# SASS of the autotuned config: FMUL 207 -> 177, FADD 81 -> 49, FFMA 74 -> 106).
# 1. every VQ-attention GPU test with both; 2. fwd_ablation at 32K: the tree, each candidate,
# both (same machine); 3. the Triton rows of #9's table for the tree (a second measurement of
# the record) and with both. TOTAL (s, default 330) caps the call.
TOTAL_DEFAULT=330
source .gpu-runs/common.sh
tree() {  # tree DIR BASE PATCH: DIR = a copy of BASE with PATCH applied
  rm -rf "$1" && cp -r "$2" "$1" && (cd "$1" && patch -p1 < .gpu-runs/$3.patch > $W/patch_$3_$(basename $1).log 2>&1)
}
tree /tmp/c2 . candidate_configs2
tree /tmp/fm . fma_codes
tree /tmp/cf /tmp/c2 fma_codes
gpu_tests /tmp/cf $(cap 140)
unset LONGVQ_TRITON_AUTOTUNE
ablate() {  # ablate DIR LABEL COMMIT-SUFFIX VARIANTS: fwd_ablation at 32K in the tree DIR
  [ $(left) -ge 30 ] || return
  (cd "$1" && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)$3" PYTHONPATH="$1" TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 40) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label "$2" --variants $4 > $W/fwd_ablation_$2.log 2>&1)
}
ablate $PWD as-is "" base
ablate /tmp/c2 candidate-configs2 -candidate-configs2 base
ablate /tmp/fm fma-codes -fma-codes base
ablate /tmp/cf candidate-configs2-fma-codes -candidate-configs2-fma-codes base,fwd+bwd
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30 --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window"
[ $(left) -ge 50 ] && t timeout -k 5 $(cap 60) $KB --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 50 ] && (cd /tmp/cf && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-candidate-configs2-fma-codes" PYTHONPATH=/tmp/cf t timeout -k 5 $(( $(left) - 3 )) $KB --store $W/kernels_cf.db --out $W/kernels_cf > $W/kernels_cf.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
