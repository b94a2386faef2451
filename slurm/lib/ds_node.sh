#!/usr/bin/env bash
# One DeepSpeed launcher per node, started by `srun --ntasks-per-node=1` from slurm/lib/train_job.sh
# (LAUNCHER=deepspeed). This is what `deepspeed --hostfile H --launcher pdsh` would start on each node over ssh,
# started by Slurm instead, so the ranks stay inside the job: signals, cgroups, accounting and clean-up work.
#
#   deepspeed --hostfile $DS_HOSTFILE --no_ssh --node_rank $SLURM_NODEID --master_addr ... train.py ARGS
#     -> deepspeed.launcher.launch (this node's ranks: RANK, LOCAL_RANK, WORLD_SIZE, CROSS_RANK, ...)
#       -> train.py, one per GPU
#
# Signals. srun relays a signal to every process of the step: here the runner, launch.py, the ranks and their data
# workers. The runner and launch.py install no SIGUSR1 handler, so SIGUSR1 would kill them (and Slurm would then
# kill the orphaned ranks mid-save). Ignoring it here is inherited across exec by both, while train.py installs
# its own handler (rankclip_ds/trainer/signals.py), so SIGUSR1 reaches the ranks only: they finish the step, save
# together and exit 75, which launch.py and the runner pass on as their own exit code.
# SIGTERM cannot be made graceful this way: launch.py answers it by terminating its children (SIGTERM, SIGKILL
# after 30 s), which the ranks count as a second signal. Use LAUNCHER=srun where preemption sends SIGTERM.
set -euo pipefail
: "${DS_HOSTFILE:?set by slurm/lib/train_job.sh}" "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${SLURM_NODEID:?}"
# DS_LAUNCHER_ARGS: more options of the `deepspeed` runner, split on spaces (e.g. "--bind_cores_to_rank").
# (${a[@]+"${a[@]}"}: an empty array under `set -u` is an error in bash < 4.4, still common on clusters.)
read -r -a launcher_args <<<"${DS_LAUNCHER_ARGS:-}"
trap '' USR1
# The environment reaches the ranks as it is, the NCCL flight recorder's TORCH_* variables from train_job.sh included:
# with --no_ssh the runner starts launch.py with `env = os.environ.copy()` and launch.py the ranks with
# `current_env = os.environ.copy()` (DeepSpeed 0.19.8; its pdsh fan-out, not used here, would forward only NCCL*,
# PYTHON*, ... variables).
exec "${PYTHON:-python3}" -u -m deepspeed.launcher.runner --hostfile "$DS_HOSTFILE" --no_ssh \
  --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  ${launcher_args[@]+"${launcher_args[@]}"} "$@"
