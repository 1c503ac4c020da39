#!/usr/bin/env bash
# staged in session 11 (no GPU lent): all 91 GPU tests first (session 10's dk/dv split d64e4cd
# and review 918aeea, and session 11's nearest-code kernel, FFT conv changes and concurrent
# Mamba directions are not yet run on a GPU), then the dk/dv A/B against d8e9ffd's kernels and a
# 4K LongVQ profile
export LONGVQ_GIT_COMMIT=$(cat .gpu-runs/commit)
export PYTHONPATH=$PWD:$PWD/.gpu-runs
export TRITON_CACHE_AUTOTUNING=1
W=$OUT/w; mkdir -p $W
t() { local s=$(date +%s); "$@"; echo "$(( $(date +%s)-s )) s: $*" >> $W/times.txt; }
nvidia-smi > $W/nvidia-smi.txt
python -m pytest --collect-only -q -m gpu tests 2>/dev/null | grep '::' > $W/gpu_tests.txt
for i in 0 1 2 3 4 5; do awk -v i=$i 'NR%6==i' $W/gpu_tests.txt > $W/shard$i.txt; done
s=$(date +%s)
for i in 0 1 2 3 4 5; do
  LONGVQ_TRITON_AUTOTUNE=0 timeout -k 5 220 python -m pytest -q -rfs -p no:cacheprovider $(cat $W/shard$i.txt) > $W/pytest_shard$i.log 2>&1 &
done
wait
echo "$(( $(date +%s)-s )) s: gpu tests" >> $W/times.txt
tail -n 2 $W/pytest_shard*.log > $W/pytest_summary.txt
export LONGVQ_TRITON_AUTOTUNE=0
# d8e9ffd's kernels: the checkout's triton.py with dkdv_split.patch (d8e9ffd -> 918aeea) reverted,
# imports absolute (triton.py is unchanged since 918aeea)
mkdir -p .gpu-runs/vq_old && touch .gpu-runs/vq_old/__init__.py
patch -R -o .gpu-runs/vq_old/triton_old.py models/vq_attention/triton.py .gpu-runs/dkdv_split.patch > $W/patch.log 2>&1
sed -i 's/^from \.\(_\?[a-z_]*\) import/from models.vq_attention.\1 import/; s/    from \.linear import/    from models.vq_attention.linear import/' .gpu-runs/vq_old/triton_old.py
t timeout -k 5 90 python .gpu-runs/vq_dkdv_ab.py 4096 65536 > $W/vq_dkdv_ab.log 2>&1
P="python run_bench.py efficiency --device cuda --compile --set d_model=128 n_layers=2 d_ffn=256 n_heads=4 vocab_size=257 n_classes=2 --warmup 3 --steps 5 --profile-top 60"
t timeout -k 5 70 $P --profile 'longvq[key_grad=window]' --lengths 4096 --batch 8 --out $W/prof4k > $W/prof4k.log 2>&1
