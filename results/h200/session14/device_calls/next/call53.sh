#!/usr/bin/env bash
# session 19: counts_histogram.patch (staged, not in the tree): the cache sums count codes with
# tl.histogram instead of a second one-hot dot against a tile of ones. call52 showed the sums
# kernel bound by its one-hot dots (0.44 ms at 32K whatever its entries and programs per SM);
# compiled for sm_90a on CPU the patch halves its HGMMA instructions (16 -> 8 in the autotuned
# config) and uses 20 registers fewer (results/cpu-triton-sm90/histogram/). sums_configs.patch
# (on top of it): two more sums configs, key tiles of 128 with 128 or all 256 codes on 8 warps
# (v read 2x or once; no spill on sm_90a with the histogram). fwd_configs.patch (on top of
# both): four more forward configs with fewer registers than the autotuned one's 254 on sm_90a.
# 1. every VQ-attention GPU test in a copy with all three patches (every config, the new ones
# included); 2. fwd_ablation at 32K as is, with the histogram, with the sums configs too, with
# all three, same machine (config_timings give each config's time); 3. the Triton rows of #9's
# table with all three. Land each patch whose tests pass and that is faster.
# TOTAL (s, default 400) caps the call.
TOTAL_DEFAULT=400
source .gpu-runs/common.sh
rm -rf /tmp/bh /tmp/bc && cp -r . /tmp/bh && (cd /tmp/bh && patch -p1 < .gpu-runs/counts_histogram.patch > $W/patch_bh.log 2>&1)
cp -r /tmp/bh /tmp/bc && (cd /tmp/bc && patch -p1 < .gpu-runs/sums_configs.patch > $W/patch_bc.log 2>&1)
rm -rf /tmp/bf && cp -r /tmp/bc /tmp/bf && (cd /tmp/bf && patch -p1 < .gpu-runs/fwd_configs.patch > $W/patch_bf.log 2>&1)
gpu_tests /tmp/bf $(cap 130)
unset LONGVQ_TRITON_AUTOTUNE
[ $(left) -ge 40 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 50) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants base,fwd+bwd > $W/fwd_ablation.log 2>&1
[ $(left) -ge 40 ] && (cd /tmp/bh && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-counts-histogram" PYTHONPATH=/tmp/bh TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 50) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label counts-histogram --variants base,fwd+bwd > $W/fwd_ablation_hist.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bc && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-counts-histogram-sums-configs" PYTHONPATH=/tmp/bc TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 50) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label counts-histogram-sums-configs --variants base,fwd+bwd > $W/fwd_ablation_both.log 2>&1)
[ $(left) -ge 40 ] && (cd /tmp/bf && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-counts-histogram-sums-configs-fwd-configs" PYTHONPATH=/tmp/bf TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 50) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label counts-histogram-sums-configs-fwd-configs --variants base,fwd+bwd > $W/fwd_ablation_all3.log 2>&1)
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
[ $(left) -ge 40 ] && (cd /tmp/bf && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-counts-histogram-sums-configs-fwd-configs" PYTHONPATH=/tmp/bf t timeout -k 5 $(( $(left) - 3 )) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
