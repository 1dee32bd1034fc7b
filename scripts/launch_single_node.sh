#!/usr/bin/env bash
# One node x NUM_GPUS GPUs under DeepSpeed (docs/deepspeed.md): one process per GPU, all with the same run dir.
#
#   scripts/launch_single_node.sh NUM_GPUS RUN_DIR [hydra overrides...]
#   scripts/launch_single_node.sh 8 outputs/vl2_small/$(date +%F_%H-%M-%S) experiment=vl2_small dist=zero2 \
#       model.path=/models/deepseek-vl2-small data.train_path=... data.eval_path=...
#
# RUN_DIR is every rank's hydra.run.dir (to resume: the same RUN_DIR and trainer.resume=auto). Pass dist=zero2 or
# dist=zero3 (dist=single refuses several ranks). Logs: RUN_DIR/train.log (rank 0), RUN_DIR/logs/rank{R}.log.
# trainer.micro_batch_size is per GPU: the global batch is micro batch x grad_accum x NUM_GPUS.
# MASTER_PORT (default 29500): set a different one for each job sharing a node. On a CPU-only machine the
# ranks are CPU processes talking over gloo (for tests: keep NUM_GPUS small and trainer.cpu_threads=1).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2
    exit 2
fi
NUM_GPUS=$1
RUN_DIR=$(realpath -m "$2")
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The launchers ignore the preemption signals, which are the ranks' to handle (see launch_node.sh).
trap '' TERM INT USR1
# --no_local_rank: Hydra would reject the --local_rank argument deepspeed appends otherwise (ranks read
# LOCAL_RANK from the environment).
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    "$ROOT/train.py" "hydra.run.dir=$RUN_DIR" "$@"
