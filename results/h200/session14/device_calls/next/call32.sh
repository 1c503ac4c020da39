#!/usr/bin/env bash
# staged in session 11: A/B at Text-4K of the LongVQ speed changes made without a GPU, in one
# call, all with Triton autotuning off (the same kernel configs in the three trees; call33 runs
# the autotuned #7 table): the checkout as is (LongVQ and SDPA), then LongVQ in a copy of the tree
# without session 11's model changes (session11_models.patch reverted: the nearest-code kernel,
# the FFT's 1/n fold and its padding outside the op), then also without session 10's casts and
# FFT layout (casts_layout.patch: c432276 + d8e9ffd, less the kernel_inputs helper that 918aeea
# rewrote); then the CUDA memory accounting of LongVQ and SDPA (efficiency --memory: saved
# tensors, and the allocator's blocks alive at the step's peak, by source line).
# Session 12 added the memory-lean rows (activation_memory_budget=0.5: LongVQ and SDPA) to the
# as-is run: what the recomputation costs in time (call33 has the lean LongVQ's --memory).
source .gpu-runs/common.sh
export LONGVQ_TRITON_AUTOTUNE=0
M="--device cuda --preset paper-text4k --compile --cuda-graph"
T0=$(date +%s)
t timeout -k 5 170 python run_bench.py efficiency $M --models 'longvq[key_grad=window],transformer_sdpa,longvq[key_grad=window;activation_memory_budget=0.5],transformer_sdpa[activation_memory_budget=0.5]' --store $W/eff.db --out $W/text4k-as-is > $W/text4k-as-is.log 2>&1
# session 15 put its one-graph change first in the chain: b1 = without it (one_graph.patch
# reverted), b2 = b1 without session 11's model changes, b3 = b2 without the casts and layout;
# the memory accounting then runs with the time left (TOTAL, default 550 s)
rm -rf /tmp/b1 && cp -r . /tmp/b1 && (cd /tmp/b1 && patch -p1 -R < .gpu-runs/one_graph.patch > $W/patch_b1.log 2>&1)
(cd /tmp/b1 && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-one-graph" PYTHONPATH=/tmp/b1 t timeout -k 5 90 python run_bench.py efficiency $M --models 'longvq[key_grad=window]' --store $W/eff_b1.db --out $W/text4k-without-one-graph > $W/text4k-without-one-graph.log 2>&1)
rm -rf /tmp/b2 && cp -r /tmp/b1 /tmp/b2 && (cd /tmp/b2 && patch -p1 -R < .gpu-runs/session11_models.patch > $W/patch_b2.log 2>&1)
(cd /tmp/b2 && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-one-graph-and-session11-models" PYTHONPATH=/tmp/b2 t timeout -k 5 90 python run_bench.py efficiency $M --models 'longvq[key_grad=window]' --store $W/eff_b2.db --out $W/text4k-without-s11 > $W/text4k-without-s11.log 2>&1)
rm -rf /tmp/b3 && cp -r /tmp/b2 /tmp/b3 && (cd /tmp/b3 && patch -p1 -R < .gpu-runs/casts_layout.patch > $W/patch_b3.log 2>&1)
(cd /tmp/b3 && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-one-graph-s11-c432276-d8e9ffd" PYTHONPATH=/tmp/b3 t timeout -k 5 90 python run_bench.py efficiency $M --models 'longvq[key_grad=window]' --store $W/eff_b3.db --out $W/text4k-without-s11-casts > $W/text4k-without-s11-casts.log 2>&1)
for m in 'longvq[key_grad=window]' transformer_sdpa; do
  left=$(( ${TOTAL:-550} - ($(date +%s) - T0) ))
  [ "$left" -ge 60 ] && t timeout -k 5 $(( left < 120 ? left : 120 )) python run_bench.py efficiency --device cuda --preset paper-text4k --compile --memory "$m" --profile-top 40 --out $W/memory > $W/memory_$(echo $m | tr -c 'a-z_\n' '_').log 2>&1
done
