#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/benchmarks.md, in stages that each fit a short GPU lease.
#
#   bash scripts/gpu_session.sh checks small          # GPU tests, then the VL2-Small reference vs optimized runs
#   bash scripts/gpu_session.sh ablations tiny packed  # each optimization alone; VL2-Tiny with images; packed rows
#   bash scripts/gpu_session.sh memory                 # the dry-run memory plan against max_memory_allocated
#   bash scripts/gpu_session.sh recompute              # VL2-Small: no recompute, selective, whole layers
#
# Needs torch with CUDA, transformers, timm, peft, safetensors, pyyaml, pytest (no Hydra, W&B or DeepSpeed:
# the model side imports none of them); the memory stage composes configs, so it needs Hydra (hydra-core, omegaconf,
# antlr4-python3-runtime). Results (JSON + logs) go to $OUT, or ./gpu_results.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
status=0
python - <<'EOF' | tee "$out/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
bench() {  # name, args...
    local name=$1
    shift
    echo "== bench $name: python scripts/bench.py $*" | tee "$out/bench_$name.log"
    python scripts/bench.py "$@" --out "$out/bench_$name.json" 2>&1 | tee -a "$out/bench_$name.log" || status=1
}
for stage in "$@"; do
    case $stage in
        checks) python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1 ;;
        small) bench small --shapes small --steps 20 --warmup 3 ;;
        ablations) bench small_ablations --shapes small --router skewed --paths all --steps 10 --warmup 2 ;;
        tiny) bench tiny --shapes tiny --steps 20 --warmup 3 ;;
        packed) bench small_packed --shapes small --sample-tokens 1024 --router skewed --steps 20 --warmup 3 ;;
        recompute) bench small_recompute --shapes small --router uniform --steps 10 --warmup 2 \
            --paths optimized,optimized+selective,optimized+recompute ;;
        memory) python -m pytest -q -s -m gpu tests/test_memory_plan.py -p no:cacheprovider 2>&1 \
            | tee "$out/memory_plan.log" || status=1 ;;
        *) echo "unknown stage $stage (checks, small, ablations, tiny, packed, memory, recompute)" >&2; exit 2 ;;
    esac
done
exit $status
