#!/usr/bin/env bash
# The GPU checks and benchmarks behind docs/benchmarks.md, sized for about 8 minutes of one H200.
#
#   bash scripts/gpu_session.sh [--wheels DIR] [--dry-run] STAGE...
#
#   all        checks e2e small tiny ablations memory, in this order (the most telling first)
#   checks     tests/test_gpu.py on CUDA: every fast path against fp32 truth
#   e2e        tests/test_gpu_end_to_end.py: train.py at full VL2-Tiny size, DeepSpeed ZeRO-2 (one rank), chat.py
#   small      bench: VL2-Small LM shapes, reference vs optimized, uniform and skewed router
#   tiny       bench: VL2-Tiny with its SigLIP tower, two 2x2-tiled images per row
#   ablations  bench: VL2-Small, skewed router, each optimization reverted or recompute added
#   memory     tests/test_memory_plan.py on CUDA: the dry-run plan against max_memory_allocated
#   packed     bench: VL2-Small rows packed with ~1k-token samples (not in all)
#   recompute  bench: VL2-Small, no recompute vs trainer.recompute=selective vs whole layers (not in all)
#   qlora      scripts/bench_qlora.py: a VL2-Small-width step on the bf16 and the nf4 base, peak against the plan
#              and step time (not in all; needs bitsandbytes: --wheels installs it when this stage is asked for)
#
# --wheels DIR  first install, offline (pip --no-index --find-links DIR), what a bare GPU image lacks: Hydra
#               (hydra-core, omegaconf, antlr4-python3-runtime) and DeepSpeed with its dependencies;
#               docs/benchmarks.md says which wheels and how to download them.
# --dry-run     every stage on the CPU in bf16 autocast: the tests' CPU variants (real widths, few layers) and
#               the bench at --layers 1 on short rows; checks the whole script without a GPU.
#
# Needs torch (CUDA), transformers, peft, timm, safetensors, pyyaml, pytest. Everything goes to $OUT (default
# gpu_results/) in few files: session.log (all output), summary.txt (each stage: status, seconds), and
# bench_<stage>.json. Each stage has a time cap, and the whole session a budget (GPU_SESSION_BUDGET seconds,
# default 540): a stage that would start with less than 20 s left is skipped. Exit status 1 when a stage failed,
# timed out or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '2,/^set -uo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2
    exit 2
}

dry=0
wheels=""
stages=()
while (($#)); do
    case $1 in
        --dry-run) dry=1 ;;
        --wheels) [[ $# -ge 2 ]] || usage; wheels=$2; shift ;;
        --wheels=*) wheels=${1#*=} ;;
        -h | --help) usage ;;
        all) stages+=(checks e2e small tiny ablations memory) ;;
        checks | e2e | small | tiny | ablations | memory | packed | recompute | qlora) stages+=("$1") ;;
        *) echo "unknown stage or option: $1 (stages: all checks e2e small tiny ablations memory packed recompute qlora)" >&2
            exit 2 ;;
    esac
    shift
done
((${#stages[@]})) || usage

OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export OUT DRY=$dry PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
export WANDB_MODE=disabled HF_HUB_OFFLINE=1

# ---------------------------------------------------------------------------------------------- the stages
# Each runs as `bash -c stage_<name>` under `timeout`, so its functions and settings are exported.
run_pytest() {
    python -m pytest -q -rfEs -s -p no:cacheprovider "$@"
}
bench() {  # name, args...: scripts/bench.py, its JSON to $OUT/bench_<name>.json
    local name=$1
    shift
    local size=()
    ((DRY)) && size=(--device cpu --precision bf16 --layers 1 --agreement-layers 1 --tokens 256 --seq 128
        --steps 1 --warmup 0)
    echo "-- python scripts/bench.py $* ${size[*]}"
    python scripts/bench.py "$@" "${size[@]}" --out "$OUT/bench_$name.json"
}
stage_checks() {
    if ((DRY)); then run_pytest tests/test_gpu.py -m "not gpu"; else run_pytest tests/test_gpu.py -m gpu; fi
}
stage_e2e() {
    if ((DRY)); then
        run_pytest tests/test_gpu_end_to_end.py -m "slow and not gpu"
    else
        run_pytest tests/test_gpu_end_to_end.py -m gpu
    fi
}
stage_small() { bench small --shapes small --steps 4 --warmup 1; }
stage_tiny() { bench tiny --shapes tiny --steps 4 --warmup 1; }
# The ablation table's rows (+compile and +feature_cache are left out: compiling 27 layers costs minutes;
# tests/test_gpu.py checks compiled layers, and VL2-Small's LM batches carry no images to cache).
stage_ablations() {
    bench ablations --shapes small --router skewed --steps 3 --warmup 1 --paths \
        reference,optimized,optimized-grouped,optimized-fused_attention,optimized-lean_ce,optimized+recompute
}
stage_memory() {
    if ((DRY)); then
        run_pytest tests/test_memory_plan.py -k on_a_real_width_slice
    else
        run_pytest tests/test_memory_plan.py -m gpu
    fi
}
stage_packed() { bench packed --shapes small --sample-tokens 1024 --router skewed --steps 4 --warmup 1; }
stage_recompute() {
    bench recompute --shapes small --router uniform --steps 4 --warmup 1 \
        --paths optimized,optimized+selective,optimized+recompute
}
stage_qlora() {
    local size=(--layers 4 --steps 10 --warmup 2)
    ((DRY)) && size=(--layers 1 --vision-layers 1 --length 1536 --steps 1 --warmup 0)
    echo "-- python scripts/bench_qlora.py ${size[*]}"
    python scripts/bench_qlora.py "${size[@]}" --out "$OUT/bench_qlora.json"
}
export -f run_pytest bench stage_checks stage_e2e stage_small stage_tiny stage_ablations stage_memory stage_packed \
    stage_recompute stage_qlora

report_versions() {
    python - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (cpu)")
for name in ("transformers", "peft", "timm", "hydra", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # a report, not a check
        print(name, "missing", f"({type(e).__name__})")
EOF
}

session() {
    echo "== gpu_session $(date -u +%FT%TZ) stages: ${stages[*]}$( ((dry)) && echo ' (dry run on the CPU)')"
    git log -1 --format='repo %h %s' 2>/dev/null || true
    report_versions

    if [[ -n $wheels ]]; then
        pip_args=(--no-index --find-links "$wheels" hydra-core omegaconf deepspeed)
        [[ " ${stages[*]} " == *" qlora "* ]] && pip_args+=(bitsandbytes==0.50.2)
        ((dry)) && pip_args=(--dry-run "${pip_args[@]}")
        echo "== pip install ${pip_args[*]}"
        python -m pip install "${pip_args[@]}" || { echo "installing the wheels from $wheels failed" >&2; return 2; }
    fi

    # Seconds each stage may take on the H200 (estimates from docs/benchmarks.md, with margin); on the CPU, more.
    declare -A cap=([checks]=90 [e2e]=210 [small]=110 [tiny]=70 [ablations]=80 [memory]=70 [packed]=90
        [recompute]=90 [qlora]=120)
    budget=${GPU_SESSION_BUDGET:-540}
    if ((dry)); then
        for s in "${!cap[@]}"; do cap[$s]=1200; done
        budget=${GPU_SESSION_BUDGET:-7200}
    fi

    status=0
    start=$SECONDS
    for stage in "${stages[@]}"; do
        left=$((budget - (SECONDS - start)))
        limit=$((cap[$stage] < left ? cap[$stage] : left))
        if ((limit < 20)); then
            echo "== $stage: skipped, ${left}s of the session's budget left"
            printf '%-10s %-10s %6s\n' "$stage" skipped - >>"$OUT/summary.txt"
            status=1
            continue
        fi
        echo "== $stage (cap ${limit}s)"
        t0=$SECONDS
        timeout --kill-after=20 "$limit" bash -c "stage_$stage"
        rc=$?
        case $rc in
            0) result=passed ;;
            124 | 137) result=timed-out ;;
            *) result="failed($rc)" ;;
        esac
        ((rc == 0)) || status=1
        echo "== $stage: $result in $((SECONDS - t0))s"
        printf '%-10s %-10s %5ds\n' "$stage" "$result" $((SECONDS - t0)) >>"$OUT/summary.txt"
    done
    echo "== summary (${SECONDS}s in all)"
    cat "$OUT/summary.txt"
    return $status
}

session 2>&1 | tee -a "$OUT/session.log"
exit "${PIPESTATUS[0]}"
