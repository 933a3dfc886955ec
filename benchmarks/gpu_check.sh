#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU:
#   1. the GPU-marked tests;
#   2. perlhf vs TRL on qwen2-0.5b's shape (race_trl.py: reward model, RLOO);
#   3. full fine-tuning vs LoRA on qwen2-0.5b's shape (bench.py: reward model, REINFORCE);
#   4. the whole test suite with CUDA visible (pytest-xdist if installed).
# Usage: bash benchmarks/gpu_check.sh [OUT]   (default OUT: benchmarks/results/cuda)
# Each part has its own time limit and failures do not stop later parts; logs go to OUT/log.txt.
set -u
OUT=${1:-benchmarks/results/cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PERLHF_BENCH_CACHE=${PERLHF_BENCH_CACHE:-/tmp/perlhf-bench}
PY=${PYTHON:-python3}
log="$OUT/log.txt"
part() { echo "=== $(date +%T) $*" | tee -a "$log"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, peft, lightning, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| lightning', lightning.__version__, '| datasets', datasets.__version__)"
} 2>&1 | tee -a "$log"
part "gpu tests"
timeout 150 $PY -m pytest -p no:cacheprovider -p no:warnings -m gpu -rs tests 2>&1 | tail -15 | tee -a "$log"
part "race_trl qwen2-0.5b rm,rloo"
timeout 300 $PY benchmarks/race_trl.py --shapes qwen2-0.5b --tasks rm,rloo --steps 3 --warmup 1 --timeout 140 \
  --out "$OUT/race" 2>&1 | grep -v "Writing model shards\|it/s\]" | tail -12 | tee -a "$log"
part "bench qwen2-0.5b rm,reinforce full,lora-r8"
timeout 300 $PY benchmarks/bench.py --shapes qwen2-0.5b --tasks rm,reinforce --settings full,lora-r8 --steps 3 \
  --warmup 1 --no-baseline --timeout 140 --out "$OUT/bench" 2>&1 | grep -v "Writing model shards\|it/s\]" | tail -12 | tee -a "$log"
part "full suite"
# One torch thread per xdist worker (by default each of the 12 workers starts a thread per core).
# The log is written as it goes, so a run cut short by the time limit still shows how far it got.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 12")
OMP_NUM_THREADS=1 timeout "${SUITE_TIMEOUT:-240}" $PY -m pytest -p no:cacheprovider -p no:warnings $xdist -q -rfE \
  > "$OUT/suite.txt" 2>&1
tail -25 "$OUT/suite.txt" | tee -a "$log"
part "done"
