# sourced by every call script: the commit the rows record, imports from the checkout,
# the output folder, and t CMD..., which runs CMD and appends its seconds to times.txt
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
# session 18: the call's clock (T0, the device's nvidia-smi), the seconds left of TOTAL (default
# TOTAL_DEFAULT, else 560) and cap N = min(N, left), for the calls from call48 on
T0=$(date +%s)
nvidia-smi > $W/nvidia-smi.txt 2>/dev/null
left() { echo $(( ${TOTAL:-${TOTAL_DEFAULT:-560}} - ($(date +%s) - T0) )); }
cap() { local c=$(left); echo $(( c < $1 ? c : $1 )); }
