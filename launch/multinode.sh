#!/usr/bin/env bash
# One node's share of a multi-node run: start it on every node with the same arguments.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config CONFIG   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh --config CONFIG   # on node 1
#
# The variables are torchrun's: NNODES, NODE_RANK, MASTER_ADDR (an address of node 0 every
# node can reach), MASTER_PORT (29500), GPUS_PER_NODE (8). LAUNCH_CONFIG picks the backend
# (default launch/ddp-8gpu.yaml; any single-node config of launch/ works: the flags below
# override its machine count, process count and rank). Arguments go to depmatch.train.
# MAX_RESTARTS (0) lets torchrun restart this node's workers after one fails; they resume
# from the newest complete checkpoint when the arguments include `--resume latest`.
# Run from the repository root: the launch configs use paths relative to it.
set -euo pipefail

: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK: 0 on the main node, 1, 2, ... on the others}"
: "${MASTER_ADDR:?set MASTER_ADDR to an address of node 0 that every node can reach}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
LAUNCH_CONFIG="${LAUNCH_CONFIG:-launch/ddp-8gpu.yaml}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [ "$MAX_RESTARTS" -gt 0 ]; then
    # Restarted workers meet in a new round of torchrun's c10d rendezvous, its backend for restarts.
    rendezvous=(--rdzv_backend c10d --max_restarts "$MAX_RESTARTS")
else
    # static rendezvous: each node is told its rank, so node 0's port is the only meeting point.
    rendezvous=(--rdzv_backend static)
fi

# depmatch launch is accelerate launch that outlives a stop signal: SIGTERM (preemption,
# scancel), SIGUSR1 (launch/slurm.sbatch's warning before the time limit) or SIGINT, to this
# process alone or to every process of the job, reaches each rank as one request to finish its
# step, checkpoint and exit; it waits for them, and exits 0 when they all exited 0.
exec depmatch launch \
    --config_file "$LAUNCH_CONFIG" \
    --num_machines "$NNODES" \
    --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --machine_rank "$NODE_RANK" \
    --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" \
    "${rendezvous[@]}" \
    --same_network \
    -m depmatch.train "$@"
