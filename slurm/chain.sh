#!/usr/bin/env bash
# Submit one training run as a chain of jobs, each starting when the previous one has ended for any reason
# (--dependency=afterany), all resuming the same run folder from its newest complete checkpoint. For runs longer
# than the partition's time limit, and as a safety net behind the requeue-on-USR1 of each job (a job that was
# cancelled, failed or timed out without requeueing is simply continued by the next link).
#
#   RUN_NAME=cc3m-b32 slurm/chain.sh 6                                    # 6 links of slurm/train.sbatch
#   RUN_NAME=cc3m-b32 slurm/chain.sh 6 --nodes=4 --time=12:00:00 -- --optim.lr 1e-3
#   RUN_NAME=demo SCRIPT=slurm/train_cpu.sbatch slurm/chain.sh 2
#
# Arguments: the number of links, then sbatch options, then `--` and train.py overrides. RUN_NAME is required:
# each link is a new job with a new id, so the default run name (<job name>-<job id>) would start a new run each
# time. Every other setting of slurm/lib/train_job.sh (CONFIG, DS_CONFIG, TRAIN_DATA, OUTPUT_DIR, LAUNCHER, ...)
# is read from this environment, as sbatch exports it to each job. A link that starts after the run has reached
# its last step resumes at that step, repeats the final evaluation and export, and ends within minutes; cancel the
# remaining links with `scancel` if you like. Prints the job ids, one per line.
set -euo pipefail

usage() {
  sed -n '2,17p' "$0" >&2
  exit 2
}

[[ $# -ge 1 && $1 =~ ^[1-9][0-9]*$ ]] || usage
links=$1
shift
: "${RUN_NAME:?set RUN_NAME: every link of the chain resumes the run folder <OUTPUT_DIR>/<RUN_NAME>}"
export RUN_NAME
script=${SCRIPT:-slurm/train.sbatch}
[[ -f $script ]] || {
  echo "chain.sh: $script not found: run from the checkout's root, or set SCRIPT" >&2
  exit 2
}

sbatch_opts=()
while [[ $# -gt 0 && $1 != -- ]]; do
  sbatch_opts+=("$1")
  shift
done
if [[ $# -gt 0 ]]; then shift; fi # the "--"

previous=""
for ((i = 1; i <= links; i++)); do
  dependency=()
  if [[ -n $previous ]]; then dependency=(--dependency="afterany:$previous"); fi
  # --parsable prints "jobid" or "jobid;cluster". ${a[@]+"${a[@]}"}: an empty array under `set -u` is an error
  # in bash < 4.4, still common on login nodes.
  previous=$(sbatch --parsable ${dependency[@]+"${dependency[@]}"} ${sbatch_opts[@]+"${sbatch_opts[@]}"} \
    "$script" "$@")
  previous=${previous%%;*}
  echo "$previous"
done
