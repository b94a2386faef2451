# shellcheck shell=bash
# The body of slurm/train.sbatch (GPU) and slurm/train_cpu.sbatch (CPU): sourced by both, so the CPU variant that
# CI runs on a real Slurm cluster is the same code as the GPU script, with other #SBATCH defaults.
#
# What one start of the job does (it may be started several times: Slurm's restart count is SLURM_RESTART_COUNT):
#   1. reads the settings below (environment variables with defaults; resources come from the allocation);
#   2. on the first start, validates the recipe with `train.py --dry-run` (seconds, one process) and stops early
#      with the error if it is wrong;
#   3. launches the training as one job step, either `srun` with one task per GPU (LAUNCHER=srun, rank environment
#      read from SLURM_* by rankclip_ds/dist.py) or `srun` with one DeepSpeed launcher per node
#      (LAUNCHER=deepspeed: `deepspeed --hostfile H --no_ssh --node_rank $SLURM_NODEID`, see slurm/lib/ds_node.sh);
#   4. waits; if SIGUSR1 reaches this script (#SBATCH --signal=B:USR1@SECONDS, or `scancel --batch
#      --signal=USR1 JOBID`), forwards it to the step: every rank finishes its step, the ranks save a checkpoint
#      together and exit 75 (rankclip_ds.trainer.signals.REQUEUE_EXIT_CODE);
#   5. if the step exited 75 (or was stopped by the forwarded signal), runs `scontrol requeue $SLURM_JOB_ID`. The
#      requeued job runs this script again; `--checkpoint.resume latest` resumes from the newest complete
#      checkpoint of the run folder, which stays the same across restarts (it is named after the job, not the
#      restart).
#
# Settings (environment variables; `sbatch --export=ALL,NAME=value` or `NAME=value sbatch ...`):
#   CONFIG          recipe YAML                            (default: the sbatch script's DEFAULT_CONFIG)
#   DS_CONFIG       DeepSpeed JSON                         (default: ds_configs/zero2.json)
#   TRAIN_DATA      shard spec, overrides data.train_data  (default: the recipe's)
#   OUTPUT_DIR      parent of run folders                  (default: runs, relative to REPO_DIR)
#   RUN_NAME        run folder name; set it to continue one run over several jobs (chains)
#                                                          (default: <job name>-<job id>)
#   LAUNCHER        srun | deepspeed                       (default: srun)
#   DS_LAUNCHER_ARGS  options for the `deepspeed` runner under LAUNCHER=deepspeed, e.g. "--bind_cores_to_rank"
#   NODES           must equal the allocation's node count (default: the allocation's; change with --nodes)
#   PROCS_PER_NODE  ranks per node                         (default: GPUs per node, else tasks per node)
#   RESUME          --checkpoint.resume value              (default: latest)
#   LOG_DIR         per-restart training logs              (default: <run folder>/logs)
#   MASTER_ADDR     rendezvous host                        (default: first host of the allocation)
#   MASTER_PORT     rendezvous port                        (default: 20000 + job id mod 20000)
#   PYTHON          interpreter                            (default: REPO_DIR/.venv/bin/python, else python3)
#   REPO_DIR        the checkout                           (default: the submit directory)
#   PREFLIGHT       1: dry-run the recipe on the first start (default: 1)
#   STEP_WAIT       seconds srun waits after the first rank exits before ending the others (a crashed rank
#                   would otherwise leave the rest blocked in a collective until dist.timeout_minutes)
#                                                          (default: 600)
#   TORCH_FR_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT, TORCH_NCCL_ENABLE_MONITORING, TORCH_NCCL_ASYNC_ERROR_HANDLING,
#   TORCH_FR_DUMP_TEMP_FILE  PyTorch's NCCL flight recorder, GPU jobs only (default: 2000, 1, 1, 3 and
#                   <run folder>/nccl_dumps/rank_, as rankclip_ds/nccl_diagnostics.py sets them; see train_job_nccl_diagnostics)
# Arguments after the script name are passed to train.py as overrides (`--optim.lr 1e-3 ...`).

REQUEUE_EXIT_CODE=75 # rankclip_ds/trainer/signals.py: EX_TEMPFAIL, "stopped on request, resume me"

job_log() {
  printf '[rankclip-slurm %(%F %T)T job %s restart %s] %s\n' -1 "${SLURM_JOB_ID:-?}" "${SLURM_RESTART_COUNT:-0}" "$*"
}

job_die() {
  job_log "error: $*"
  exit 2
}

# export NAME=VALUE, unless NAME or one of the other names PyTorch reads for the same setting is set already: the
# user's value wins, as in rankclip_ds/nccl_diagnostics.py.
export_unless_set() {
  local name=$1 value=$2 other
  for other in "$name" "${@:3}"; do
    [[ -z ${!other:-} ]] || return 0
  done
  export "$name=$value"
}

# PyTorch's NCCL flight recorder, GPU jobs only (gloo reads none of it): on a collective timeout every rank writes
# its last collectives to <run folder>/nccl_dumps/rank_<rank> before it is torn down; `torchfrtrace <that folder>`
# reads them. The names and values of nccl_diagnostics_env (rankclip_ds/nccl_diagnostics.py), which gives the
# reason for each from PyTorch 2.14's source. The ranks apply them again (and create the folder) before the NCCL
# process group exists; exported here as well, they are in the job's log and reach every process of the step under
# either launcher, whatever its entry point.
train_job_nccl_diagnostics() {
  local dump_dir=$RUN_DIR/nccl_dumps
  [[ $dump_dir == /* ]] || dump_dir=$PWD/$dump_dir # the ranks' working directory may differ
  export_unless_set TORCH_FR_BUFFER_SIZE 2000 TORCH_NCCL_TRACE_BUFFER_SIZE
  export_unless_set TORCH_NCCL_DUMP_ON_TIMEOUT 1
  export_unless_set TORCH_NCCL_ENABLE_MONITORING 1
  export_unless_set TORCH_NCCL_ASYNC_ERROR_HANDLING 3 NCCL_ASYNC_ERROR_HANDLING
  export_unless_set TORCH_FR_DUMP_TEMP_FILE "$dump_dir/rank_" TORCH_NCCL_DEBUG_INFO_TEMP_FILE
  NCCL_DUMP_PREFIX=${TORCH_FR_DUMP_TEMP_FILE:-${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-}}
}

# The trap: remember the signal and hand it to the training step exactly once (the trainer treats a second signal
# as "exit now, without saving").
STOP_SIGNAL=""
STOP_FORWARDED=""
TERM_SEEN=""
STEP_PID=""

forward_stop_signal() {
  if [[ -n $STOP_SIGNAL && -z $STOP_FORWARDED && -n $STEP_PID ]] && kill -0 "$STEP_PID" 2>/dev/null; then
    STOP_FORWARDED=1
    job_log "forwarding SIG$STOP_SIGNAL to the training step (srun pid $STEP_PID): the ranks finish the current" \
      "step, save a checkpoint together and exit $REQUEUE_EXIT_CODE"
    # srun relays the signal to every process of the step (all ranks; under LAUNCHER=deepspeed also the
    # launchers, which ignore it, see slurm/lib/ds_node.sh).
    kill -s "$STOP_SIGNAL" "$STEP_PID" 2>/dev/null || true
  fi
}

on_usr1() {
  job_log "received SIGUSR1 (time limit or preemption warning)"
  STOP_SIGNAL=USR1
  forward_stop_signal
}

on_term() {
  # Slurm sends SIGTERM to the steps itself when the job is cancelled, preempted or out of time; forwarding it
  # would be a second signal to the ranks. Remember it so that we do not requeue a job being cancelled.
  job_log "received SIGTERM (job cancelled, preempted or at its time limit): the ranks got it from Slurm too"
  TERM_SEEN=1
}

train_job_settings() {
  : "${SLURM_JOB_ID:?this script runs inside a Slurm job: submit it with sbatch}"
  RESTART=${SLURM_RESTART_COUNT:-0}
  REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
  [[ -f $REPO_DIR/rankclip_ds/train.py ]] ||
    job_die "REPO_DIR=$REPO_DIR is not a RankCLIP-DS checkout (no rankclip_ds/train.py): submit from the" \
      "checkout's root (cd /path/to/rankclip-ds && sbatch slurm/train.sbatch) or set REPO_DIR"
  cd "$REPO_DIR" || job_die "cannot cd to REPO_DIR=$REPO_DIR"
  if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $REPO_DIR/.venv/bin/python ]]; then
      PYTHON=$REPO_DIR/.venv/bin/python
    else
      PYTHON=$(command -v python3) || job_die "no python3 on PATH and no $REPO_DIR/.venv: set PYTHON"
    fi
  fi
  LAUNCHER=${LAUNCHER:-srun}
  [[ $LAUNCHER == srun || $LAUNCHER == deepspeed ]] || job_die "LAUNCHER=$LAUNCHER: use srun or deepspeed"
  CONFIG=${CONFIG:-$DEFAULT_CONFIG}
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
  [[ -f $CONFIG ]] || job_die "CONFIG=$CONFIG does not exist (relative paths are relative to $REPO_DIR)"
  [[ -f $DS_CONFIG ]] || job_die "DS_CONFIG=$DS_CONFIG does not exist (relative paths are relative to $REPO_DIR)"
  TRAIN_DATA=${TRAIN_DATA:-}
  OUTPUT_DIR=${OUTPUT_DIR:-runs}
  RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-rankclip}-$SLURM_JOB_ID}
  RUN_DIR=$OUTPUT_DIR/$RUN_NAME
  LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}
  RESUME=${RESUME:-latest}
  PREFLIGHT=${PREFLIGHT:-1}
  STEP_WAIT=${STEP_WAIT:-600}

  local allocated=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  NODES=${NODES:-$allocated}
  [[ $NODES == "$allocated" ]] ||
    job_die "NODES=$NODES but the job has $allocated node(s): submit with sbatch --nodes=$NODES"
  if [[ -z ${PROCS_PER_NODE:-} ]]; then
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
      PROCS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
      PROCS_PER_NODE=$SLURM_NTASKS_PER_NODE
    else
      PROCS_PER_NODE=${SLURM_TASKS_PER_NODE:-1}
      PROCS_PER_NODE=${PROCS_PER_NODE%%[(,]*} # "8(x2)" or "2,1" -> the first node's count
    fi
  fi
  [[ $PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]] || job_die "PROCS_PER_NODE=$PROCS_PER_NODE is not a positive integer"
  if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 && $PROCS_PER_NODE != "$SLURM_GPUS_ON_NODE" ]]; then
    job_die "PROCS_PER_NODE=$PROCS_PER_NODE but $SLURM_GPUS_ON_NODE GPUs per node are allocated: one rank per" \
      "GPU (sbatch --ntasks-per-node=N --gpus-per-node=N)"
  fi
  WORLD_SIZE_PLANNED=$((NODES * PROCS_PER_NODE))

  if [[ -z ${MASTER_ADDR:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" | head -n 1) || true
    [[ -n $MASTER_ADDR ]] || job_die "could not read the first host of SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
  fi
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))} # as rankclip_ds/dist.py derives it
  export MASTER_ADDR MASTER_PORT
  if [[ -n ${SLURM_CPUS_PER_TASK:-} && -z ${OMP_NUM_THREADS:-} ]]; then
    export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK # one rank's share of the node's cores
  fi
  export PYTHONUNBUFFERED=1
  NCCL_DUMP_PREFIX=""
  if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then train_job_nccl_diagnostics; fi

  TRAIN_ARGS=(rankclip_ds/train.py --deepspeed "$DS_CONFIG" --config "$CONFIG" --run.output_dir "$OUTPUT_DIR"
    --run.name "$RUN_NAME" --checkpoint.resume "$RESUME")
  if [[ -n $TRAIN_DATA ]]; then TRAIN_ARGS+=(--data.train_data "$TRAIN_DATA"); fi
  TRAIN_ARGS+=("$@")
}

# The job step that runs the training, as an array in STEP_CMD.
train_job_step_command() {
  # Explicit, because a site default of KillOnBadExit=1 would kill the other ranks when the first one exits,
  # and the step would then report their signal (143) instead of the requeue code 75.
  local common=(--nodes="$NODES" --kill-on-bad-exit=0 --wait="$STEP_WAIT" --export=ALL)
  if [[ $LAUNCHER == srun ]]; then
    STEP_CMD=(srun "${common[@]}" --ntasks="$WORLD_SIZE_PLANNED" --ntasks-per-node="$PROCS_PER_NODE")
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then STEP_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    # Every task sees all of its node's GPUs and takes cuda:$SLURM_LOCALID (rankclip_ds/dist.py); a per-task
    # binding would leave local rank 3 with a single visible device.
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then STEP_CMD+=(--gpu-bind=none); fi
    STEP_CMD+=("$PYTHON" -u "${TRAIN_ARGS[@]}")
  else
    # The hostfile DeepSpeed's runner reads: one line per node, "host slots=<ranks per node>".
    export DS_HOSTFILE=$LOG_DIR/hostfile-job$SLURM_JOB_ID-restart$RESTART
    scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v slots="$PROCS_PER_NODE" '{ print $1 " slots=" slots }' \
      >"$DS_HOSTFILE"
    export PYTHON
    # One task per node holding the CPUs the job asked for on each node (ranks × cpus-per-task).
    STEP_CMD=(srun "${common[@]}" --ntasks="$NODES" --ntasks-per-node=1
      --cpus-per-task="$((PROCS_PER_NODE * ${SLURM_CPUS_PER_TASK:-1}))" bash slurm/lib/ds_node.sh "${TRAIN_ARGS[@]}")
  fi
}

train_job_requeue() {
  local latest=$RUN_DIR/checkpoints/latest
  trap - USR1 TERM
  if [[ -f $latest ]]; then
    job_log "requeueing: the next start resumes from $RUN_DIR/checkpoints/$(<"$latest")"
  else
    job_log "requeueing: no complete checkpoint yet, the next start begins from scratch"
  fi
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0 # Slurm ends this start now and queues the job again (restart count + 1)
  fi
  job_log "scontrol requeue failed (was the job submitted with --no-requeue, or is JobRequeue=0?); resubmit with" \
    "RUN_NAME=$RUN_NAME to resume"
  exit "$REQUEUE_EXIT_CODE"
}

train_job_main() {
  train_job_settings "$@"
  trap on_usr1 USR1
  trap on_term TERM
  mkdir -p "$LOG_DIR"
  STEP_LOG=$LOG_DIR/job$SLURM_JOB_ID-restart$RESTART.log
  job_log "start: job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}), restart $RESTART, $NODES node(s) ${SLURM_JOB_NODELIST:-}," \
    "$PROCS_PER_NODE rank(s) per node = world $WORLD_SIZE_PLANNED, LAUNCHER=$LAUNCHER"
  job_log "run folder $RUN_DIR; recipe $CONFIG; DeepSpeed $DS_CONFIG; master $MASTER_ADDR:$MASTER_PORT"
  job_log "commit $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown); python $PYTHON"
  if [[ -n $NCCL_DUMP_PREFIX ]]; then
    job_log "NCCL flight recorder: a collective timeout dumps to ${NCCL_DUMP_PREFIX}<rank>; read with" \
      "torchfrtrace $(dirname "$NCCL_DUMP_PREFIX")"
  fi
  if [[ -f $RUN_DIR/checkpoints/latest ]]; then
    job_log "checkpoint to resume: $RUN_DIR/checkpoints/$(<"$RUN_DIR/checkpoints/latest")"
  fi

  if [[ $PREFLIGHT == 1 && $RESTART == 0 ]]; then
    job_log "preflight: train.py --dry-run --dry-run-world-size $WORLD_SIZE_PLANNED"
    "$PYTHON" "${TRAIN_ARGS[@]}" --dry-run --dry-run-world-size "$WORLD_SIZE_PLANNED" </dev/null ||
      job_die "the recipe does not validate (dry run above); nothing was launched"
  fi
  if [[ -n $STOP_SIGNAL ]]; then
    job_log "stop signal arrived before the launch"
    train_job_requeue
  fi

  train_job_step_command
  job_log "launch: ${STEP_CMD[*]}"
  job_log "training log: $STEP_LOG"
  "${STEP_CMD[@]}" </dev/null >>"$STEP_LOG" 2>&1 &
  STEP_PID=$!
  forward_stop_signal # a signal that came between the launch and the line above
  # `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting for the step itself.
  while kill -0 "$STEP_PID" 2>/dev/null; do
    wait "$STEP_PID" || true
  done
  local rc=0
  wait "$STEP_PID" || rc=$?
  job_log "training step exited with code $rc"

  local ungraceful_file=$LOG_DIR/stops-without-checkpoint-in-a-row ungraceful=0
  if [[ $rc == 0 ]]; then
    rm -f "$ungraceful_file"
    job_log "done: $RUN_DIR (TensorBoard: tensorboard --logdir $RUN_DIR/tb)"
    exit 0
  fi
  if [[ -n $TERM_SEEN ]]; then
    job_log "not requeueing after SIGTERM: a cancelled job stays cancelled, and a preempted one is requeued by" \
      "Slurm itself where PreemptMode=REQUEUE; resubmit with RUN_NAME=$RUN_NAME to resume"
    exit "$rc"
  fi
  if [[ $rc == "$REQUEUE_EXIT_CODE" ]]; then
    rm -f "$ungraceful_file"
    train_job_requeue
  fi
  if [[ -n $STOP_FORWARDED ]]; then
    # Another code after a forwarded signal: it came while a rank could not take it gracefully (before the
    # trainer installed its handler, or during the final evaluation/export); the newest complete checkpoint is
    # intact, so resuming is safe. But if that keeps happening, the signal comes during start-up every time
    # (time limit shorter than start-up + the signal's lead time): stop instead of requeueing forever.
    if [[ -f $ungraceful_file ]]; then ungraceful=$(<"$ungraceful_file"); fi
    ungraceful=$((ungraceful + 1))
    if [[ $ungraceful -lt 3 ]]; then
      echo "$ungraceful" >"$ungraceful_file"
      job_log "the ranks did not stop gracefully (exit code $rc; $ungraceful time(s) in a row)"
      train_job_requeue
    fi
    rm -f "$ungraceful_file" # a resubmission starts counting afresh
    job_log "the stop signal killed the ranks before they could checkpoint $ungraceful times in a row: the time" \
      "limit is too short for the start-up plus the --signal lead time; not requeueing (raise --time or lower" \
      "the lead time, then resubmit with RUN_NAME=$RUN_NAME to resume)"
  fi
  job_log "training failed (exit code $rc); last lines of $STEP_LOG:"
  tail -n 40 "$STEP_LOG"
  exit "$rc"
}
