#!/usr/bin/env bash
# Train a recipe: one process, torchrun on this node, or every task of a slurm allocation.
#
#   ./launcher.sh [RECIPE.yaml] [--nproc N] [--set key=value ...] [other sedd_scale.train flags]
#
#   RECIPE       default recipes/cpu-tiny.yaml
#   --nproc N    processes per node. Without slurm: 1 (default) runs python directly, N > 1 runs
#                torchrun on this node. Inside a slurm allocation (SLURM_JOB_ID set, e.g. from
#                tools/slurm.sbatch): default is the allocation's task count; N sets the tasks per
#                node instead. One srun task per rank: RANK/LOCAL_RANK/WORLD_SIZE come from
#                SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, MASTER_ADDR is the first host of the job's
#                node list, MASTER_PORT (unless set) is 20000 + (the first 32 bits of the sha256 of
#                the job id) mod 12768: in 20000-32767, below Linux's ephemeral ports, and any two
#                job ids (nearby ones, 20000 apart, array tasks) get unrelated ports. The venv's
#                python must be on a filesystem every node sees.
#   --set k=v    recipe overrides (several after one --set, or repeat --set)
#   --nnodes N --node-rank R --rdzv HOST:PORT
#                several nodes without slurm: run this on every node (R = 0 .. N-1, the same HOST:PORT,
#                reachable from all; node 0 hosts torchrun's c10d rendezvous there); --nproc per node
#   SEDD_PYTHON=/path/to/python  use that interpreter (e.g. an NGC container's, with its own torch,
#                Transformer Engine and apex) instead of building .venv (tools/bootstrap.sh checks it)
#
#   ./launcher.sh [--nproc N] --tool NAME [ARGS ...]
#
#   --tool NAME  run tools/NAME.py (evaluate, sample) on every rank instead of training; all
#                arguments after NAME are the tool's (e.g. --tool evaluate runs/x --split test)
#
# The virtual environment comes from tools/bootstrap.sh (a no-op once built). The recipe and the
# layout for the world size are checked before anything is started; the resolved layout is printed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "launcher: $*" >&2; exit 2; }

recipe="" nproc="" sets=() extra=() tool="" tool_args=() nnodes="" node_rank="" rdzv=""
while (($#)); do
  case "$1" in
    --tool) [ $# -ge 2 ] || die "--tool needs a name (evaluate, sample)"
      tool="$2"; shift 2; tool_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --nproc) [ $# -ge 2 ] || die "--nproc needs a number"; nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --nnodes) [ $# -ge 2 ] || die "--nnodes needs a number"; nnodes="$2"; shift 2 ;;
    --node-rank) [ $# -ge 2 ] || die "--node-rank needs a number"; node_rank="$2"; shift 2 ;;
    --rdzv) [ $# -ge 2 ] || die "--rdzv needs HOST:PORT"; rdzv="$2"; shift 2 ;;
    --set) shift
      [ $# -ge 1 ] && [[ "$1" == *=* ]] || die "--set needs key=value (e.g. --set optim.lr=1e-4)"
      while (($#)) && [[ "$1" == *=* && "$1" != -* ]]; do sets+=("$1"); shift; done ;;
    --set=*) sets+=("${1#--set=}"); shift ;;
    -*) extra+=("$1"); shift ;;  # passed to sedd_scale.train (e.g. --layout-only)
    *) [ -z "$recipe" ] || die "two recipes given: '$recipe' and '$1'"; recipe="$1"; shift ;;
  esac
done
if [ -n "$tool" ]; then
  [ -z "$recipe" ] && [ ${#sets[@]} -eq 0 ] && [ ${#extra[@]} -eq 0 ] || \
    die "--tool takes no recipe, --set or training flags: the tool's own arguments follow its name"
  [[ "$tool" =~ ^[a-z_]+$ && -f "$root/tools/$tool.py" ]] || die "unknown tool '$tool' (evaluate, sample)"
fi
recipe="${recipe:-$root/recipes/cpu-tiny.yaml}"
[[ -z "$nproc" || "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"
if [ -n "$nnodes$node_rank$rdzv" ]; then
  [[ "$nnodes" =~ ^[1-9][0-9]*$ && "$node_rank" =~ ^[0-9]+$ && "$rdzv" =~ ^[^:]+:[0-9]+$ ]] || \
    die "several nodes need --nnodes N --node-rank R --rdzv HOST:PORT together (got '$nnodes', '$node_rank', '$rdzv')"
  [ "$node_rank" -lt "$nnodes" ] || die "--node-rank $node_rank is not below --nnodes $nnodes"
  [ -z "${SLURM_JOB_ID:-}" ] || die "--nnodes/--rdzv are for clusters without slurm; inside an allocation srun starts the ranks"
fi

py="$("$root/tools/bootstrap.sh")" || die "tools/bootstrap.sh failed (see its log above)"
[ -z "${SEDD_PYTHON:-}" ] || export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # no venv: the checkout itself

set_args=()
for s in ${sets[@]+"${sets[@]}"}; do set_args+=(--set "$s"); done
train=(-m sedd_scale.train "$recipe" ${set_args[@]+"${set_args[@]}"} ${extra[@]+"${extra[@]}"})
[ -z "$tool" ] || train=("$root/tools/$tool.py" ${tool_args[@]+"${tool_args[@]}"})

if [ -n "${SLURM_JOB_ID:-}" ]; then
  command -v srun >/dev/null || die "SLURM_JOB_ID is set but srun is not on PATH"
  # What slurm sets in an allocation, checked here (set -u would stop at the first use with `unbound variable`).
  [ -n "${SLURM_JOB_NODELIST:-}" ] || die "SLURM_JOB_NODELIST is not set: run inside a slurm allocation (sbatch," \
    "salloc) or unset SLURM_JOB_ID to run on this machine"
  nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "SLURM_JOB_NUM_NODES must be a positive integer, got '$nodes'"
  if [ -n "$nproc" ]; then
    world=$((nodes * nproc))
    srun_args=(--nodes="$nodes" --ntasks="$world" --ntasks-per-node="$nproc")
  else
    [ -n "${SLURM_NTASKS:-}" ] || die "SLURM_NTASKS is not set (an allocation without a task count): pass --nproc" \
      "(tasks per node)"
    [[ "$SLURM_NTASKS" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NTASKS must be a positive integer, got '$SLURM_NTASKS'"
    world="$SLURM_NTASKS"
    srun_args=(--ntasks="$world")
  fi
  if [ -n "${MASTER_PORT:-}" ]; then
    [[ "$MASTER_PORT" =~ ^[1-9][0-9]{0,4}$ ]] && ((MASTER_PORT <= 65535)) || \
      die "MASTER_PORT must be a port number (1-65535), got '$MASTER_PORT'"
  else
    # A hash of the whole id (not the id modulo the range, which repeats every range's width); see the top.
    digest="$(printf %s "$SLURM_JOB_ID" | sha256sum)" || die "sha256sum failed (coreutils is needed for MASTER_PORT)"
    MASTER_PORT=$((20000 + 16#${digest:0:8} % 12768))
  fi
  mode="slurm: $nodes node(s), srun $world tasks"
elif [ -n "$nnodes" ]; then
  world=$((nnodes * ${nproc:-1}))
  mode="torchrun: node $node_rank of $nnodes, ${nproc:-1} process(es) each, rendezvous $rdzv"
else
  world="${nproc:-1}"
  if [ "$world" -eq 1 ]; then mode="single process"; else mode="torchrun: $world processes on this node"; fi
fi
# megatron's tensor-parallel communication overlaps compute only with one CUDA connection per device;
# a dead rank fails the collective (the variable's current name) instead of hanging the job.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

if [ -z "$tool" ]; then
  # Pre-flight: refuse an impossible recipe or layout, or a run directory the recipe cannot continue
  # (sedd_scale/train/run_dir.py), before any process starts.
  PYTHONWARNINGS=ignore "$py" -m sedd_scale.train.run_dir "$recipe" --world-size "$world" ${set_args[@]+"${set_args[@]}"} || exit $?
  echo "launcher: $mode (recipe $recipe)"
else
  echo "launcher: $mode (tools/$tool.py)"
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  # Read the whole list (with pipefail, `| head -n 1` can kill scontrol with SIGPIPE).
  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")" || die "scontrol show hostnames failed"
  MASTER_ADDR="${hosts%%$'\n'*}"
  [ -n "$MASTER_ADDR" ] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
  export MASTER_ADDR MASTER_PORT
  echo "launcher: master $MASTER_ADDR:$MASTER_PORT"
  # Each task maps slurm's ids to torch.distributed's variables, then becomes the trainer (or tool).
  exec srun --kill-on-bad-exit=1 "${srun_args[@]}" bash -c \
    'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"; exec "$@"' \
    sedd-task "$py" "${train[@]}"
elif [ "$world" -eq 1 ] && [ -z "$nnodes" ]; then
  exec "$py" "${train[@]}"
else
  # torchrun turns a SIGTERM it receives into a crash (exit 1) and kills the workers 30 s later, maybe
  # in the middle of their pre-emption checkpoint. So it runs in its own session, where signals meant
  # for the job do not reach it; this script hands SIGTERM / SIGUSR1 / SIGINT to the workers instead.
  # They checkpoint and exit 0 (SEDD_STOP_EXIT_CODE), torchrun exits 0, and this script exits 143
  # (128 + SIGTERM) so that schedulers requeue the job.
  # SIGKILL of this script cannot be trapped, and torchrun, in its own session, would outlive it with the
  # workers and the run lock. So torchrun starts through a few lines of Python that ask the kernel to send
  # it SIGTERM when this script dies (prctl PR_SET_PDEATHSIG, kept across the exec into torchrun; the
  # parent check closes the window where this script died first): torchrun then stops its workers as on
  # any SIGTERM (they write a pre-emption checkpoint; whatever is left after 30 s is killed) and exits.
  # (Not `exec torchrun`: it would turn the scheduler's SIGTERM into a crash, see above.)
  export SEDD_STOP_EXIT_CODE=0
  if [ -n "$nnodes" ]; then
    host_flag=$([ "$node_rank" -eq 0 ] && echo 1 || echo 0)  # node 0 hosts the rendezvous store
    run=(--nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "${nproc:-1}" --rdzv-backend c10d
         --rdzv-endpoint "$rdzv" --rdzv-id "sedd-$rdzv" --rdzv-conf "is_host=$host_flag")
  else
    run=(--standalone --nproc-per-node "$world")
  fi
  die_with_parent='import ctypes, os, signal, sys
os.setsid()
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM) != 0:  # 1: PR_SET_PDEATHSIG
    sys.exit(f"launcher: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
if os.getppid() != int(sys.argv[1]):
    sys.exit("launcher: the launcher exited before torchrun started")
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])'
  "$py" -c "$die_with_parent" "$$" -m torch.distributed.run "${run[@]}" "${train[@]}" &
  child=$! stopped=""
  forward() { stopped="$1"; pkill "-$1" -P "$child" || true; }
  trap 'forward TERM' TERM; trap 'forward USR1' USR1; trap 'forward INT' INT
  while :; do
    rc=0; wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break  # wait returns early when a trapped signal arrives
  done
  if [ -n "$stopped" ] && [ "$stopped" != INT ] && [ "$rc" -eq 0 ]; then
    echo "launcher: stopped by SIG$stopped after the workers' checkpoint; exit 143 (requeue)" >&2
    exit 143
  fi
  exit "$rc"
fi
