#!/usr/bin/env bash
# session 18: #9's full kernel table with the bench's fixed timing (CUDA events around calls run
# back to back; never right after an autotuning call): L = 1K..64K, fwd and fwd+bwd, the Triton
# VQ op, the torch linear path, flash SDPA and fla's linear attention, GB/s against 3,350.
# call47's Triton rows came from 2 calls straight after autotuning (its 16K forward read 6.7 ms).
# Then fwd_ablation (20 calls back to back) for the same commit, with sums4/sums8: the cache
# sums split into more segments now that ~60 registers fewer let more programs share an SM, and
# chunk256 (half the code cache; the band, now cheaper, grows).
# Last, the A/B of the parallel precompile of autotune configs. TOTAL (s, default 420) caps
# the call.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
unset LONGVQ_TRITON_AUTOTUNE
left() { echo $(( ${TOTAL:-420} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
t timeout -k 5 $(cap 220) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window,linear-window,sdpa-flash,fla-linear --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 30 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 120) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants base,fwd+bwd,no-bias,chunk256,sums4,sums8 > $W/fwd_ablation.log 2>&1
# the precompile A/B (models/vq_attention/_precompile.py): a cold first forward+backward in a
# fresh process, TRITON_ALWAYS_COMPILE=1 (Triton's disk cache not read), as is and with
# precompile.patch reverted; fwd_ablation's first_call_s is the compile + autotune time
rm -rf /tmp/bp && cp -r . /tmp/bp && (cd /tmp/bp && patch -p1 -R < .gpu-runs/precompile.patch > $W/patch_bp.log 2>&1)
[ $(left) -ge 50 ] && TRITON_ALWAYS_COMPILE=1 TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 60) python .gpu-runs/fwd_ablation.py --out $W/precompile_ab --label precompile --variants fwd+bwd > $W/precompile_on.log 2>&1
[ $(left) -ge 50 ] && (cd /tmp/bp && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-precompile" PYTHONPATH=/tmp/bp TRITON_ALWAYS_COMPILE=1 TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 90) python .gpu-runs/fwd_ablation.py --out $W/precompile_ab --label without-precompile --variants fwd+bwd > $W/precompile_off.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
