#!/usr/bin/env bash
# session 18: #9's full kernel table with the bench's fixed timing (CUDA events around calls run
# back to back; never right after an autotuning call): L = 1K..64K, fwd and fwd+bwd, the Triton
# VQ op, the torch linear path, flash SDPA and fla's linear attention, GB/s against 3,350.
# call47's Triton rows came from 2 calls straight after autotuning (its 16K forward read 6.7 ms).
# Then fwd_ablation (20 calls back to back) for the same commit, with sums4/sums8: the cache
# sums split into more segments now that ~60 registers fewer let more programs share an SM, and
# chunk256 (half the code cache; the band, now cheaper, grows).
# Then the A/B of the parallel precompile of autotune configs; last, dq_8warps.patch's configs.
# TOTAL (s, default 560) caps the call.
TOTAL_DEFAULT=560
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 2 --repeats 10 --cell-budget 30"
t timeout -k 5 $(cap 220) $KB --lengths 1k,2k,4k,8k,16k,32k,64k --modes fwd,fwd+bwd --impls triton-window,linear-window,sdpa-flash,fla-linear --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 30 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 120) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants base,fwd+bwd,no-bias,chunk256,sums4,sums8 > $W/fwd_ablation.log 2>&1
# the precompile A/B (models/triton_precompile.py): a cold first forward+backward in a
# fresh process, TRITON_ALWAYS_COMPILE=1 (Triton's disk cache not read), as is and with
# precompile.patch reverted; fwd_ablation's first_call_s is the compile + autotune time
rm -rf /tmp/bp && cp -r . /tmp/bp && (cd /tmp/bp && patch -p1 -R < .gpu-runs/precompile.patch > $W/patch_bp.log 2>&1)
[ $(left) -ge 50 ] && TRITON_ALWAYS_COMPILE=1 TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 60) python .gpu-runs/fwd_ablation.py --out $W/precompile_ab --label precompile --variants fwd+bwd > $W/precompile_on.log 2>&1
[ $(left) -ge 50 ] && (cd /tmp/bp && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-precompile" PYTHONPATH=/tmp/bp TRITON_ALWAYS_COMPILE=1 TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 90) python .gpu-runs/fwd_ablation.py --out $W/precompile_ab --label without-precompile --variants fwd+bwd > $W/precompile_off.log 2>&1)
# dq_8warps.patch (staged, not in the tree): two more dq configs, 64-row tiles on 8 warps, which
# do not spill on sm_90a where every 4-warp one with 64-wide key tiles does (the fastest, 2.43 ms
# of call47's 7.94 ms fwd+bwd, spills 188 B a thread). In a copy with the patch applied: their
# every-config tests first, then fwd+bwd autotuned (if faster and the tests pass: land the patch)
rm -rf /tmp/bq && cp -r . /tmp/bq && (cd /tmp/bq && patch -p1 < .gpu-runs/dq_8warps.patch > $W/patch_bq.log 2>&1)
[ $(left) -ge 60 ] && (cd /tmp/bq && LONGVQ_TRITON_AUTOTUNE=0 PYTHONPATH=/tmp/bq t timeout -k 5 $(cap 90) python -m pytest -q -p no:cacheprovider tests/test_vq_attention_triton.py -k "every_config and (dq-6 or dq-7)" > $W/pytest_dq8.log 2>&1)
[ $(left) -ge 30 ] && (cd /tmp/bq && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-dq-8warps" PYTHONPATH=/tmp/bq TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(( $(left) - 3 )) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label dq-8warps --variants fwd+bwd > $W/fwd_ablation_dq8.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
