#!/usr/bin/env bash
# session 17: #7's "the full scaling sweep for all entries completes in under 10 minutes on one
# H100" (last run in session 3: 241 s, eager): `--preset scaling` as a researcher runs it (every
# entry, L = 1K..64K, the preset's defaults), its wall time in times.txt; the rows also give the
# crossovers, >= 3x SDPA at 32K, 64K and the growth of every entry from one run. Cold: no Triton
# cache travels. Session 19: on common.sh's clock (T0, nvidia-smi, left).
# TOTAL (s, default 560) caps it (a cut sweep keeps its finished rows in the store).
TOTAL_DEFAULT=560
source .gpu-runs/common.sh
unset LONGVQ_TRITON_AUTOTUNE
t timeout -k 5 $(( $(left) - 5 )) python run_bench.py efficiency --device cuda --preset scaling --models all --store $W/eff.db --out $W/scaling-all > $W/scaling-all.log 2>&1
echo "total $(( $(date +%s) - T0 )) s" >> $W/times.txt
