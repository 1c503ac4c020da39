#!/usr/bin/env bash
# session 19: counts_histogram.patch (staged, not in the tree): the cache sums count codes with
# tl.histogram instead of a second one-hot dot against a tile of ones. call52 showed the sums
# kernel bound by its one-hot dots (0.44 ms at 32K whatever its entries and programs per SM);
# compiled for sm_90a on CPU the patch halves its HGMMA instructions (16 -> 8 in the autotuned
# config) and uses 20 registers fewer (results/cpu-triton-sm90/histogram/). sums_configs.patch
# (on top of it): two more sums configs, key tiles of 128 with 128 or all 256 codes on 8 warps
# (v read 2x or once; no spill on sm_90a with the histogram). fwd_configs.patch (on top of
# both): four more forward configs with fewer registers than the autotuned one's 254 on sm_90a.
# session 20: bias_bf16.patch (on top of all three, and alone): the forward's bias table in the
# input dtype (bf16 here), the bias rounded to it once for every kernel, as flash attention
# reads an additive mask: the 128 x 32 bias tile was the forward's largest load (16 KB in fp32,
# as many as q's tile; 73.7 -> 57.3 KB of shared memory in the autotuned config on sm_90a).
# 1. every VQ-attention GPU test in a copy with all four patches (every config, the new ones
# included); 2. fwd_ablation at 32K as is, with the histogram, with the sums configs too, with
# the fwd configs too, with all four, and with the bf16 bias alone, same machine (config_timings
# give each config's time); 3. the Triton rows of #9's table with all four.
# Land each patch whose tests pass and that is faster. TOTAL (s, default 420) caps the call.
TOTAL_DEFAULT=420
source .gpu-runs/common.sh
tree() {  # tree DIR BASE PATCH: DIR = a copy of BASE with PATCH applied
  rm -rf "$1" && cp -r "$2" "$1" && (cd "$1" && patch -p1 < .gpu-runs/$3.patch > $W/patch_$3_$(basename $1).log 2>&1)
}
tree /tmp/bh . counts_histogram
tree /tmp/bc /tmp/bh sums_configs
tree /tmp/bf /tmp/bc fwd_configs
tree /tmp/bb /tmp/bf bias_bf16
tree /tmp/bbias . bias_bf16
gpu_tests /tmp/bb $(cap 130)
unset LONGVQ_TRITON_AUTOTUNE
ablate() {  # ablate DIR LABEL VARIANTS: fwd_ablation at 32K in the tree DIR
  [ $(left) -ge 40 ] || return
  (cd "$1" && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)${2/#-as-is/}" PYTHONPATH="$1" TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 50) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label "${2:1}" --variants $3 > $W/fwd_ablation_${2:1}.log 2>&1)
}
ablate $PWD -as-is base,fwd+bwd
ablate /tmp/bh -counts-histogram base
ablate /tmp/bc -counts-histogram-sums-configs base
ablate /tmp/bf -counts-histogram-sums-configs-fwd-configs base
ablate /tmp/bb -counts-histogram-sums-configs-fwd-configs-bias-bf16 base,fwd+bwd
ablate /tmp/bbias -bias-bf16 base
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
[ $(left) -ge 40 ] && (cd /tmp/bb && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-counts-histogram-sums-configs-fwd-configs-bias-bf16" PYTHONPATH=/tmp/bb t timeout -k 5 $(( $(left) - 3 )) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
