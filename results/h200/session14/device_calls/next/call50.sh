#!/usr/bin/env bash
# session 18: what parallel compilation of autotune configs (models/triton_precompile.py, on for
# every run_bench command) saves on a cold first cell, per entry: mamba2 (mamba-ssm's Triton
# kernels: 133 s in call45's sweep), longvq and transformer_vq (ours: 88 s, 61 s). Each cell once
# with LONGVQ_PARALLEL_COMPILE=0 (Triton's serial compiles) and once as is, in fresh processes,
# TRITON_ALWAYS_COMPILE=1 (Triton's disk cache not read). The run's "Wall time" line is the
# measurement. TOTAL (s, default 560) caps the call.
TOTAL_DEFAULT=560
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE
cell() {  # cell MODEL LABEL [env...]
  local model=$1 label=$2; shift 2
  [ $(left) -ge 40 ] && (export "$@" TRITON_ALWAYS_COMPILE=1 TRITON_CACHE_AUTOTUNING=0; t timeout -k 5 $(cap 160) python run_bench.py efficiency --device cuda --preset scaling --lengths 2048 --models "$model" --store $W/$label.db > $W/$label.log 2>&1)
  grep -h "Wall time" $W/$label.log | sed "s/^/$label: /" >> $W/wall.txt
}
cell mamba2 mamba2-parallel LONGVQ_PARALLEL_COMPILE=1
cell mamba2 mamba2-serial LONGVQ_PARALLEL_COMPILE=0
cell 'longvq[key_grad=window]' longvq-parallel LONGVQ_PARALLEL_COMPILE=1
cell 'longvq[key_grad=window]' longvq-serial LONGVQ_PARALLEL_COMPILE=0
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
