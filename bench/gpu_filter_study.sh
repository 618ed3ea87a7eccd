#!/usr/bin/env bash
# The hit filter's ablation on a lent GPU (bench/RESULTS.md, "Hit filter at pile-up 200"): every arm of
# bench/hit_filter_study.py x 3 seeds, eight trainings at once on one GPU, float32 as on the CPU.
# Run in the repository root with the wheels of hydra-core, omegaconf and antlr4 in .whl/ (the device
# has torch and the rest); results, tarred every 20 s (a time-out still returns them), to $OUT.
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT" /tmp/study
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, os; print('torch', torch.__version__, 'cpus', os.cpu_count())"
(while sleep 20; do tar czf "$OUT/study.tar.gz" -C /tmp study 2>/dev/null; done) &
timeout "${STUDY_SECONDS:-450}" python3 bench/hit_filter_study.py --device cuda --jobs 8 \
    --arms full no_timing phi_order fewer_neighbours attention_beside wide attention_only reference_size \
    --seeds 0 1 2 --set trainer.precision=fp32 paths.data=/tmp/data --out /tmp/study
tar czf "$OUT/study.tar.gz" -C /tmp study
