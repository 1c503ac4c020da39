#!/usr/bin/env bash
# session 16 (written after call36 on an H100): test_compiled_graphed_step_trains_like_eager_steps
# failed for LongVQ (fp32, --compile --cuda-graph): Triton's make_ttgir failed on the inductor
# kernel triton_per_fused_clamp_min_div_mul_sum_13. 1. the test in a copy of the tree without
# one_graph.patch (is session 15's one graph the cause?); 2. the test as is with
# TORCH_LOGS=output_code (the failing kernel's source); 3. growth 8K -> 64K (call37's first run)
# and Mamba with concurrent_directions=false, with the time left. TOTAL (s, default 400) caps it.
source .gpu-runs/common.sh
T0=$(date +%s)
left() { echo $(( ${TOTAL:-400} - ($(date +%s) - T0) )); }
TEST='tests/test_gpu_longvq.py::test_compiled_graphed_step_trains_like_eager_steps[longvq[key_grad=window]]'
rm -rf /tmp/b0 && cp -r . /tmp/b0 && (cd /tmp/b0 && patch -p1 -R < .gpu-runs/one_graph.patch > $W/patch_b0.log 2>&1)
(cd /tmp/b0 && PYTHONPATH=/tmp/b0 t timeout -k 5 75 python -m pytest -q -x -p no:cacheprovider "$TEST" > $W/compiled_test_without_one_graph.log 2>&1)
TORCH_LOGS=output_code t timeout -k 5 75 python -m pytest -q -x -p no:cacheprovider "$TEST" > $W/compiled_test_output_code.log 2>&1
grep -n "def triton_per_fused_clamp_min_div_mul_sum" $W/compiled_test_output_code.log > $W/failing_kernel_lines.txt
[ $(left) -ge 60 ] && LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 $(( $(left) < 160 ? $(left) : 160 )) python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models 'longvq[key_grad=window],mamba,linear_attn' --store $W/eff.db --out $W/scaling-cg > $W/scaling-cg.log 2>&1
[ $(left) -ge 50 ] && LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 $(( $(left) < 70 ? $(left) : 70 )) python run_bench.py efficiency --device cuda --preset scaling --compile --cuda-graph --lengths 8192,65536 --models mamba --set concurrent_directions=false --store $W/mamba_sequential.db --out $W/mamba-sequential > $W/mamba-sequential.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
