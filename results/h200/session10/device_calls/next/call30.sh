#!/usr/bin/env bash
# staged in session 10: A/B of c432276 + d8e9ffd (the casts in the model, the FFT's conj and
# contiguous input), which call28 did not show to help (4.02 ms / 785 MiB against 3.96 / 760 at
# eaec48b): Text-4K LongVQ and SDPA, autotuned, with the checkout as is and with those two
# commits reverted (a copy of the tree, the patch applied in reverse); then the memory breakdown
# of the compiled LongVQ step (150 s: compiling alone took > 60 s in session 10)
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
M="--device cuda --preset paper-text4k --compile --cuda-graph --models longvq[key_grad=window],transformer_sdpa"
t timeout -k 5 110 python run_bench.py efficiency $M --store $W/eff.db --out $W/text4k-as-is > $W/text4k-as-is.log 2>&1
rm -rf /tmp/reverted && cp -r . /tmp/reverted && (cd /tmp/reverted && patch -p1 -R < .gpu-runs/model_casts_layout.patch > $W/patch.log 2>&1)
(cd /tmp/reverted && LONGVQ_GIT_COMMIT="$(cat .gpu-runs/commit)-without-c432276-d8e9ffd" PYTHONPATH=/tmp/reverted t timeout -k 5 110 python run_bench.py efficiency $M --store $W/eff_reverted.db --out $W/text4k-reverted > $W/text4k-reverted.log 2>&1)
LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 150 python .gpu-runs/mem_breakdown.py 'longvq[key_grad=window]' 4096 8 > $W/mem_longvq.log 2>&1
