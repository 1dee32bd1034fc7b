#!/usr/bin/env bash
# Run a list of multi-GPU (DeepSpeed) training runs one after another, each in its own run dir under one sweep dir.
#
#   scripts/sweep_multi_gpu.sh [options] -- "RUN 1 OVERRIDES" "RUN 2 OVERRIDES" ...
#   scripts/sweep_multi_gpu.sh [options] -f runs.txt        # one run per line (blank lines and # comments skipped)
#
#   -n N        GPUs per run (default: all visible, from nvidia-smi)
#   -d DIR      sweep dir (default: multirun/<-s name>/<time>); run i goes to DIR/<i> (0, 1, ...)
#   -s NAME     sweep name for the default dir (default: sweep)
#   -c "ARGS"   overrides common to every run (default: "dist=zero2")
#   -l "CMD"    launcher (default: "deepspeed --num_gpus N --no_local_rank"); e.g. "torchrun --nproc_per_node N",
#               or "python" for one-process runs (then also -c without dist=zero2)
#   -f FILE     read the runs from FILE, one line of overrides per run (before any given after --)
#   -k          keep going after a failed run (default: stop at the first failure)
#   -x          dry run: print the commands, run nothing
#
# Each run is  <launcher> train.py <common> hydra.run.dir=DIR/<i> <run overrides>  with
# DEEPSEEK_VL2_LORA_SWEEP_DIR=DIR, DEEPSEEK_VL2_LORA_SWEEP_JOB=<i> and DEEPSEEK_VL2_LORA_SWEEP_RUN=<run overrides>
# exported, so W&B puts every run of the sweep in one group (<experiment name>-<sweep dir name>), names it by its
# run overrides and tags it with all overrides, as a Hydra multirun would (deepseek_vl2_lora/training/sweep.py). DIR/runs.tsv lists run dir, exit status and overrides.
# Compare the runs with
#   python scripts/compare.py DIR
# Example:
#   scripts/sweep_multi_gpu.sh -n 8 -d multirun/vl2_small_policies -c "experiment=vl2_small dist=zero2 \
#       model.path=/models/deepseek-vl2-small" -- "policy=mla_lowrank" "policy=mla_lowrank_lora" "policy=lora_o_mlp"
set -u -o pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

num_gpus="" sweep_dir="" sweep_name="sweep" common="dist=zero2" launcher="" keep_going=0 dry_run=0 runs_file=""
while getopts "n:d:s:c:l:f:kxh" opt; do
    case "$opt" in
        n) num_gpus="$OPTARG" ;;
        d) sweep_dir="$OPTARG" ;;
        s) sweep_name="$OPTARG" ;;
        c) common="$OPTARG" ;;
        l) launcher="$OPTARG" ;;
        f) runs_file="$OPTARG" ;;
        k) keep_going=1 ;;
        x) dry_run=1 ;;
        h) usage 0 ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

runs=()
if [ -n "$runs_file" ]; then
    [ -f "$runs_file" ] || { echo "error: no such runs file: $runs_file" >&2; exit 2; }
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%#*}"
        [ -n "${line//[[:space:]]/}" ] && runs+=("$line")
    done < "$runs_file"
fi
runs+=("$@")
[ "${#runs[@]}" -gt 0 ] || { echo "error: no runs given" >&2; usage; }

if [ -z "$launcher" ]; then
    if [ -z "$num_gpus" ]; then
        num_gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
        [ "$num_gpus" -gt 0 ] 2>/dev/null || num_gpus=1
    fi
    launcher="deepspeed --num_gpus $num_gpus --no_local_rank"
fi
[ -n "$sweep_dir" ] || sweep_dir="multirun/$sweep_name/$(date +%Y-%m-%d_%H-%M-%S)"
train_py="$(cd "$(dirname "$0")/.." && pwd)/train.py"  # run from anywhere; relative paths are from here

if [ "$dry_run" = 0 ]; then
    mkdir -p "$sweep_dir"
    printf 'run_dir\tstatus\toverrides\n' > "$sweep_dir/runs.tsv"
fi
export DEEPSEEK_VL2_LORA_SWEEP_DIR="$sweep_dir"
failed=0
for i in "${!runs[@]}"; do
    run_dir="$sweep_dir/$i"
    # Word splitting is intended: the launcher and the override strings are lists of words.
    # shellcheck disable=SC2086
    cmd=($launcher "$train_py" $common "hydra.run.dir=$run_dir" ${runs[$i]})
    export DEEPSEEK_VL2_LORA_SWEEP_JOB="$i" DEEPSEEK_VL2_LORA_SWEEP_RUN="${runs[$i]}"
    echo "[sweep $((i + 1))/${#runs[@]}] DEEPSEEK_VL2_LORA_SWEEP_DIR=$sweep_dir DEEPSEEK_VL2_LORA_SWEEP_JOB=$i ${cmd[*]}"
    [ "$dry_run" = 1 ] && continue
    "${cmd[@]}"
    status=$?
    printf '%s\t%s\t%s\n' "$run_dir" "$status" "${runs[$i]}" >> "$sweep_dir/runs.tsv"
    if [ "$status" != 0 ]; then
        failed=$((failed + 1))
        echo "[sweep] run $i failed (exit $status): $run_dir" >&2
        [ "$keep_going" = 1 ] || { echo "[sweep] stopping (pass -k to keep going)" >&2; exit "$status"; }
    fi
done
[ "$dry_run" = 1 ] || echo "[sweep] done: ${#runs[@]} runs, $failed failed; python scripts/compare.py $sweep_dir"
[ "$failed" = 0 ]
