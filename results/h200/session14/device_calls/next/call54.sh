#!/usr/bin/env bash
# session 20, after call53: the tree has the histogram counts and the 64 x 32 x 32 forward config
# (call53: fwd 1.796 -> 1.630 ms at 32K in fwd_ablation). candidate_configs.patch (not in the
# tree): five forward configs around the winner (64-row tiles: BLOCK_S 64, BLOCK_N 64 or 16, 4
# or 2 stages; 96-143 registers on sm_90a, none spills) and three sums configs (128-key tiles on
# 4 stages or 8 warps, 256-key tiles on 8 warps).
# 1. every VQ-attention GPU test with the candidates (every config of the tree's lists too);
# 2. fwd_ablation at 32K: the tree (base, fwd+bwd, chunk64, chunk256, no-bias), the candidates
# (base, fwd+bwd); 3. #9's whole table (Triton, torch linear, SDPA flash, fla) of the tree.
# Land a candidate that wins and whose tests pass. TOTAL (s, default 400) caps the call.
TOTAL_DEFAULT=400
source .gpu-runs/common.sh
rm -rf /tmp/b2 && cp -r . /tmp/b2 && (cd /tmp/b2 && patch -p1 < .gpu-runs/candidate_configs.patch > $W/patch_candidates.log 2>&1)
gpu_tests /tmp/b2 $(cap 130)
unset LONGVQ_TRITON_AUTOTUNE
ablate() {  # ablate DIR LABEL VARIANTS: fwd_ablation at 32K in the tree DIR
  [ $(left) -ge 40 ] || return
  (cd "$1" && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)$3" PYTHONPATH="$1" TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 60) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label "$2" --variants $4 > $W/fwd_ablation_$2.log 2>&1)
}
ablate $PWD as-is "" base,fwd+bwd,chunk64,chunk256,no-bias
ablate /tmp/b2 candidate-configs -candidate-configs base,fwd+bwd
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
[ $(left) -ge 60 ] && t timeout -k 5 $(( $(left) - 3 )) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window,linear-window,sdpa-flash,fla-linear --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
