#!/usr/bin/env bash
# Several nodes from one command, over ssh (DeepSpeed's pdsh launcher; docs/deepspeed.md).
#
#   scripts/launch_multi_node.sh HOSTFILE GPUS_PER_NODE RUN_DIR [hydra overrides...]
#   scripts/launch_multi_node.sh hostfile 8 /shared/outputs/vl2/$(date +%F_%H-%M-%S) experiment=vl2 dist=zero3 \
#       model.path=/models/deepseek-vl2 data.train_path=... data.eval_path=...
#
# HOSTFILE: one line per node, "node-a slots=8"; the first node is the master (MASTER_ADDR overrides the address
# DeepSpeed looks up with `ssh <first node> hostname -I`). Needs passwordless ssh from here to every node, pdsh,
# this repository and its venv at the same path on every node, and RUN_DIR on a file system all nodes share
# (checkpoints are written by every rank). Environment variables reach the other nodes only through a
# `.deepspeed_env` file (KEY=VALUE lines) in the working directory or $HOME, e.g. WANDB_MODE=online.
# Without ssh between nodes: scripts/launch_node.sh on each node, or scripts/slurm_train.sbatch.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2
    exit 2
fi
HOSTFILE=$(realpath "$1")
GPUS_PER_NODE=$2
RUN_DIR=$(realpath -m "$3")
shift 3
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"  # pdsh runs the command in this directory on every node
exec deepspeed --hostfile "$HOSTFILE" --num_gpus "$GPUS_PER_NODE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
    --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    "$ROOT/train.py" "hydra.run.dir=$RUN_DIR" "$@"
