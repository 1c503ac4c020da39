#!/usr/bin/env bash
# session 16, when ~850 s of device time were left after two failed starts: call40's diagnosis,
# the #9 table, call37's growth run, a short forward ablation and the codegen.patch A/B, in one
# call (a start costs ~180 s of held time). TOTAL (s, default 560) caps it.
source .gpu-runs/common.sh
T0=$(date +%s)
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
nvidia-smi > $W/nvidia-smi.txt
TEST='tests/test_gpu_longvq.py::test_compiled_graphed_step_trains_like_eager_steps[longvq[key_grad=window]]'
rm -rf /tmp/b0 && cp -r . /tmp/b0 && (cd /tmp/b0 && patch -p1 -R < .gpu-runs/one_graph.patch > $W/patch_b0.log 2>&1)
(cd /tmp/b0 && PYTHONPATH=/tmp/b0 t timeout -k 5 70 python -m pytest -q -x -p no:cacheprovider "$TEST" > $W/compiled_test_without_one_graph.log 2>&1)
TORCH_LOGS=output_code t timeout -k 5 70 python -m pytest -q -x -p no:cacheprovider "$TEST" > $W/compiled_test_output_code.log 2>&1
KB="python run_bench.py kernels --device cuda --dtype bf16 --causal --batch 8 --heads 8 --dim 64 --codebook-size 256 --window 64 --warmup 1 --repeats 3 --cell-budget 30"
[ $(left) -ge 60 ] && t timeout -k 5 $(cap 90) $KB --lengths 16k,32k --modes fwd,fwd+bwd --impls triton-window,sdpa-flash --store $W/kernels.db --out $W/kernels > $W/kernels.log 2>&1
[ $(left) -ge 60 ] && LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 $(cap 160) python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],mamba,linear_attn' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
[ $(left) -ge 40 ] && TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 110) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants base,codes-only,sdpa-256keys,fwd+bwd > $W/fwd_ablation.log 2>&1
rm -rf /tmp/bc && cp -r . /tmp/bc && (cd /tmp/bc && patch -p1 -R < .gpu-runs/codegen.patch > $W/patch_bc.log 2>&1)
[ $(left) -ge 30 ] && (cd /tmp/bc && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-codegen" PYTHONPATH=/tmp/bc TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 $(cap 90) python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label without-codegen --variants base,fwd+bwd > $W/fwd_ablation_nocodegen.log 2>&1)
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
