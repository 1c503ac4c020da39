#!/usr/bin/env bash
# session 10: bidirectional query chunk CH 64/128/256 with the new far cache, op level (graphed),
# first configs at 4K and 64K, then autotuned at 4K
export PYTHONPATH=$PWD:$PWD/.gpu-runs
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
LONGVQ_TRITON_AUTOTUNE=0 t timeout -k 5 90 python .gpu-runs/vq_chunk_ab.py 4096 65536 > $W/vq_chunk_ab.log 2>&1
t timeout -k 5 150 python .gpu-runs/vq_chunk_ab.py 4096 > $W/vq_chunk_ab_autotune.log 2>&1
