#!/usr/bin/env bash
# One node of a multi-node job, started on each node by you or a scheduler: no ssh between nodes
# (DeepSpeed's --no_ssh; docs/deepspeed.md).
#
#   scripts/launch_node.sh NODE_RANK NUM_NODES GPUS_PER_NODE MASTER_ADDR RUN_DIR [hydra overrides...]
#   node 0:  scripts/launch_node.sh 0 2 8 10.0.0.1 /shared/outputs/vl2/run1 experiment=vl2 dist=zero3 ...
#   node 1:  scripts/launch_node.sh 1 2 8 10.0.0.1 /shared/outputs/vl2/run1 experiment=vl2 dist=zero3 ...
#
# Same arguments on every node except NODE_RANK (0 .. NUM_NODES-1; `slurm` takes $SLURM_NODEID). MASTER_ADDR is
# node 0's address, reachable from every node; MASTER_PORT (default 29500) must be free there. RUN_DIR must be
# on a file system all nodes share. Rank r = NODE_RANK x GPUS_PER_NODE + local GPU index. If one rank fails, its
# node's launcher stops that node and the other nodes' ranks fail at their next collective (or the scheduler
# ends them: srun --kill-on-bad-exit=1).
set -euo pipefail
if [[ $# -lt 5 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2
    exit 2
fi
NODE_RANK=$1
[[ $NODE_RANK == slurm ]] && NODE_RANK=${SLURM_NODEID:?NODE_RANK=slurm outside a SLURM job}
NUM_NODES=$2
GPUS_PER_NODE=$3
MASTER_ADDR=$4
RUN_DIR=$(realpath -m "$5")
shift 5
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# DeepSpeed's launcher learns the number of nodes from a hostfile; with --no_ssh only the count and slots of its
# lines matter (their names are never contacted), so write one for this node.
mkdir -p "$RUN_DIR/logs"
HOSTFILE="$RUN_DIR/logs/hostfile.node$NODE_RANK"
for ((i = 0; i < NUM_NODES; i++)); do echo "node$i slots=$GPUS_PER_NODE"; done > "$HOSTFILE"
# Preemption (deepseek_vl2_lora/training/preemption.py): the launchers ignore SIGTERM, SIGINT and SIGUSR1, so a signal to
# the whole job (SLURM's, Ctrl-C's) is the ranks' to handle: they finish the step, checkpoint together and exit 75.
trap '' TERM INT USR1
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --num_nodes "$NUM_NODES" \
    --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    "$ROOT/train.py" "hydra.run.dir=$RUN_DIR" "$@"
