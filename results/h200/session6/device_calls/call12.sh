#!/usr/bin/env bash
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
M='transformer_vanilla,transformer_sdpa,longvq[key_grad=window],longvq,transformer_vq[key_grad=window],linear_attn,mamba,s4d'
t timeout 160 python run_bench.py efficiency --device cuda --preset paper-text4k --models "$M" --store $W/eff.db --out $W/paper-text4k > $W/paper-text4k.log 2>&1
t timeout 140 python run_bench.py efficiency --device cuda --preset paper-text4k --cuda-graph --models "$M" --store $W/eff.db --out $W/paper-text4k-graph > $W/paper-text4k-graph.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 80 python run_bench.py efficiency --device cuda --preset scaling --cuda-graph --models 'transformer_sdpa,longvq[key_grad=window],transformer_vq[key_grad=window],linear_attn,mamba' --store $W/eff.db --out $W/scaling-graph > $W/scaling-graph.log 2>&1
t timeout 40 python run_bench.py efficiency --device cuda --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof > $W/prof4k.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 90 python -m pytest -q -rfs -p no:cacheprovider tests/test_gpu_longvq.py -k cuda_graph > $W/pytest_graph.log 2>&1
KB="python run_bench.py kernels --device cuda --dtype bf16 --window 64 --codebook-size 256 --dim 64 --warmup 1 --repeats 3 --cell-budget 30"
t timeout 60 $KB --causal --batch 8 --heads 8 --lengths 32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash --out $W/kernels_b8h8 > $W/kernels_b8h8.log 2>&1
