#!/usr/bin/env bash
# session 18: the 32K forward taken apart first (fwd_ablation.py as is: where #9's 10x-roofline
# forward spends its time, before any kernel change), then call44's full scaling sweep of every
# entry (eager, timed: #7's "< 10 min"; a cut sweep keeps its rows and says it ran longer than
# its cap). TOTAL (s, default 560) caps the call; ABL_CAP (default 150) the ablation.
source .gpu-runs/common.sh
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt
unset LONGVQ_TRITON_AUTOTUNE
left() { echo $(( ${TOTAL:-560} - ($(date +%s) - T0) )); }
TRITON_CACHE_AUTOTUNING=0 t timeout -k 5 ${ABL_CAP:-150} python .gpu-runs/fwd_ablation.py --out $W/fwd_ablation --label as-is --variants ${ABL_VARIANTS:-base,codes-only,sdpa-256keys,chunk256,S64,no-bias} > $W/fwd_ablation.log 2>&1
echo "sweep cap $(( $(left) - 5 )) s" >> $W/times.txt
t timeout -k 5 $(( $(left) - 5 )) python run_bench.py efficiency --device cuda --preset scaling --models all --store $W/eff.db --out $W/scaling-all > $W/scaling-all.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
