#!/usr/bin/env bash
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
P="python run_bench.py efficiency --device cuda --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5"
t timeout 170 $P --profile 'longvq[key_grad=window]' --lengths 32768 --batch 2 --out $W/prof > $W/prof32k.log 2>&1
t timeout 60 $P --profile 'transformer_sdpa' --lengths 32768 --batch 2 --out $W/prof > $W/prof32k_sdpa.log 2>&1
t timeout 100 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof > $W/prof4k.log 2>&1
KB="python run_bench.py kernels --device cuda --dtype bf16 --batch 2 --heads 1 --dim 64 --value-dim 256 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
t timeout 120 $KB --lengths 32k --modes fwd,fwd+bwd --impls triton-window --out $W/kernels_longvq_shape > $W/kernels_longvq_shape.log 2>&1
cd $OUT && tar czf r.tgz w
