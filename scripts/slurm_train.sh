#!/bin/bash
# Train LexVLA on N nodes x 8 GPUs under SLURM: one launcher per node (`python -m lexvla.train --num_processes ...`,
# which runs `accelerate launch -m lexvla.train` for that node's 8 ranks), the node of rank 0 being the main machine.
#
#   sbatch --nodes 2 scripts/slurm_train.sh                         # the paper recipe on 2 x 8 GPUs (16 ranks)
#   CONFIG=my_recipe.yaml OUT_DIR=/shared/runs/x sbatch --nodes 4 scripts/slurm_train.sh --set max_steps=20000
#
# Submit it again to resume: the run continues from the newest checkpoint in OUT_DIR (resume: auto), which must lie
# on a filesystem every node mounts at the same path. Arguments after the script go to `python -m lexvla.train`
# (--set key=value, --callback module:name). README.md, "Training on several machines", says more.
#SBATCH --job-name=lexvla
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the node's GPUS_PER_NODE ranks
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64           # the ranks' data-loader workers (README: "Data for 8 GPUs")
#SBATCH --time=24:00:00
#SBATCH --output=lexvla-%j.out
set -euo pipefail

export CONFIG=${CONFIG:-lexvla/configs/paper_cc12m.yaml}
export OUT_DIR=${OUT_DIR:-runs/paper}
export DATA_URLS=${DATA_URLS:-}                   # e.g. '/data/cc12m/{00000..01242}.tar' ("": the config's data.urls)
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export PYTHON=${PYTHON:-python}
# The main machine is the job's first node; every node is told the same address and port.
export MAIN_ADDRESS=${MAIN_ADDRESS:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export NUM_MACHINES=$SLURM_NNODES

# Each srun task is one node's launcher; SLURM_NODEID (0 .. N-1) is its machine rank, read inside the task.
# --kill-on-bad-exit: when one node's launcher fails, SLURM stops the others at once (lexvla would stop them within
# the config's dist_timeout anyway: a collective that waits longer for a lost rank fails).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  set -euo pipefail
  data=(); [ -n "$DATA_URLS" ] && data=(--set "data.urls=$DATA_URLS")
  exec "$PYTHON" -m lexvla.train --config "$CONFIG" --set "out_dir=$OUT_DIR" ${data[@]+"${data[@]}"} \
      --num_processes "$GPUS_PER_NODE" --num_machines "$NUM_MACHINES" --machine_rank "$SLURM_NODEID" \
      --main_address "$MAIN_ADDRESS" --main_port "$MAIN_PORT" "$@"' lexvla-launcher "$@"
