#!/usr/bin/env bash
# staged in session 8: 4K profiles of LongVQ and SDPA (kernels per step), 64K profile of LongVQ
# with the chunked S4D, #9's 32K cell autotuned
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
export LONGVQ_TRITON_AUTOTUNE=0
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 60"
t timeout -k 5 70 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
t timeout -k 5 60 $P --profile transformer_sdpa --lengths 4096 --batch 8 --out $W/prof4k_sdpa > $W/prof4k_sdpa.log 2>&1
t timeout -k 5 70 $P --profile 'longvq[key_grad=window;ssm_conv=chunked]' --lengths 65536 --batch 1 --out $W/prof64k_chunked > $W/prof64k_chunked.log 2>&1
unset LONGVQ_TRITON_AUTOTUNE
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
t timeout -k 5 120 $KB --lengths 32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
export LONGVQ_TRITON_AUTOTUNE=0
t timeout -k 5 40 python .gpu-runs/s4d_conv_bench3.py 4x16384 2x32768 > $W/s4d_conv_bench3.log 2>&1
t timeout -k 5 30 python .gpu-runs/s4d_layer_prof.py chunked 1 65536 > $W/s4d_prof_chunked64k.log 2>&1
t timeout -k 5 30 python .gpu-runs/s4d_layer_prof.py fft 8 4096 > $W/s4d_prof_fft4k.log 2>&1
