#!/usr/bin/env bash
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 150 python -m pytest -q -rfs -p no:cacheprovider tests/test_gpu_longvq.py -k "compiled or cuda_graph_step" > $W/pytest_compile.log 2>&1
M='transformer_vanilla,transformer_sdpa,longvq[key_grad=window],mamba,linear_attn,transformer_vq[key_grad=window],s4d,longvq'
t timeout 230 python run_bench.py efficiency --device cuda --preset paper-text4k --compile --cuda-graph --models "$M" --store $W/eff.db --out $W/paper-text4k-cg > $W/paper-text4k-cg.log 2>&1
t timeout 60 python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof > $W/prof4k.log 2>&1
t env LONGVQ_TRITON_AUTOTUNE=0 timeout 150 python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,16384,32768,65536 --models 'longvq[key_grad=window],transformer_sdpa' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
