# sourced by call32, call34, call36 and call37: the commit the rows record, imports from the checkout,
# the output folder, and t CMD..., which runs CMD and appends its seconds to times.txt
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
