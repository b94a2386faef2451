#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for tests/test_slurm*.py: munged + slurmctld + slurmd, as root.
#
#   tests/slurm/cluster.sh start DIR CTLD_PORT SLURMD_PORT   # prints "export SLURM_CONF=DIR/etc/slurm.conf" on success
#   tests/slurm/cluster.sh stop DIR
#
# Everything lives under DIR (config, munge key and socket, state, spool, logs, pid files): the machine's own
# /etc/slurm, /etc/munge and /run/munge are never touched, and two test sessions with different DIRs and ports
# do not collide. Needs Debian's slurm-wlm and munge packages. `start` exits non-zero with the reason on stderr
# (and the daemons' logs) if the cluster does not come up; the test then skips with that reason.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

dump_logs() {
  local f
  for f in "$DIR"/log/*.log; do
    [[ -f $f ]] || continue
    echo "---- $f (last 30 lines)" >&2
    tail -n 30 "$f" >&2
  done
}

pid_of() { # pid_of FILE: the pid in a pid file, if that process is alive
  local pid
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  local ctld_port=$1 slurmd_port=$2 tool hw
  for tool in munged slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y slurm-wlm munge)"
  done
  [[ $(id -u) -eq 0 ]] || die "must run as root (SlurmUser=root; slurmd starts jobs as the submitting user)"
  mkdir -p "$DIR"/{etc,munge,state,spool,log,run}
  chmod 700 "$DIR/munge"

  # munge: a fresh key and a private socket for this cluster only.
  head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket.2" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" ||
    {
      dump_logs
      die "munged did not start"
    }

  # The node's hardware as slurmd sees it (CPUs, sockets, cores, threads), so the node is not drained for a
  # mismatch; memory is left at Slurm's default since the tests request none.
  hw=$(slurmd -C | head -n 1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' |
    tr '\n' ' ')
  [[ -n $hw ]] || die "slurmd -C printed no hardware description"
  sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$(hostname)|g" -e "s|@CTLD_PORT@|$ctld_port|g" \
    -e "s|@SLURMD_PORT@|$slurmd_port|g" -e "s|@NODE_HW@|$hw|g" "$here/slurm.conf.in" >"$DIR/etc/slurm.conf"
  export SLURM_CONF="$DIR/etc/slurm.conf"

  slurmctld -f "$SLURM_CONF" -i || {
    dump_logs
    die "slurmctld did not start"
  }
  # NodeName=localhost in slurm.conf: the node's name resolves everywhere, so the job scripts' master address does.
  slurmd -f "$SLURM_CONF" -N localhost || {
    dump_logs
    die "slurmd did not start"
  }
  for _ in $(seq 1 60); do
    if [[ $(sinfo -h -N -o '%T' 2>/dev/null | head -n 1) == idle ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 1
  done
  sinfo -N -l >&2 || true
  dump_logs
  die "the node did not become idle within 60 s"
}

stop() {
  local name pid
  [[ -d $DIR ]] || return 0
  # Cancel what is left first, so that no slurmstepd (and no training) outlives the daemons.
  export SLURM_CONF="$DIR/etc/slurm.conf"
  if pid_of "$DIR/run/slurmctld.pid" >/dev/null && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
    squeue -h -o %i | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 1 60); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
  for name in slurmd slurmctld munged; do
    pid=$(pid_of "$DIR/run/$name.pid") || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
  done
}

cmd=${1:-}
DIR=${2:-}
[[ -n $cmd && -n $DIR ]] || die "usage: $0 start DIR CTLD_PORT SLURMD_PORT | stop DIR"
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
case $cmd in
  start)
    [[ $# -eq 4 ]] || die "usage: $0 start DIR CTLD_PORT SLURMD_PORT"
    start "$3" "$4"
    ;;
  stop) stop ;;
  *) die "unknown command $cmd (start or stop)" ;;
esac
