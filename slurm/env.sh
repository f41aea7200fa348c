# shellcheck shell=bash
# The cluster environment for mtp_occ jobs: edit the placeholders below once per cluster.
#
# Sourced twice, on purpose:
#   - by you, on the login node, before submitting:   source slurm/env.sh && make sweep LAUNCHER=slurm
#     (partition/account/qos are read when the sweep is *submitted*, by conf/hydra/launcher/slurm*.yaml);
#   - by every job, first thing in its sbatch script (the launchers' `setup: [source slurm/env.sh]`),
#     for modules, caches, NCCL and the rendezvous address.
# Jobs inherit the submitting shell's environment (sbatch's default --export=ALL) and submitit starts them
# with the submitting Python, so the venv needs no activation here. Safe to source in an interactive
# shell: no `exit`, no `set -e`, and a missing module only prints a warning.

# ---- submission: read by conf/hydra/launcher/slurm*.yaml; unset = the cluster's default ---------------
# (leave a line commented rather than setting it empty: an empty value would reach sbatch as-is)
# export MTP_OCC_SLURM_PARTITION=gpu
# export MTP_OCC_SLURM_ACCOUNT=my-project
# export MTP_OCC_SLURM_QOS=normal

# ---- software: modules your cluster needs for CUDA/NCCL (placeholders) -------------------------------
_mtp_occ_modules=()  # e.g. (cuda/12.4 nccl/2.21)
if [ ${#_mtp_occ_modules[@]} -gt 0 ]; then
  if command -v module >/dev/null 2>&1; then
    module load "${_mtp_occ_modules[@]}" || echo "slurm/env.sh: warning: module load ${_mtp_occ_modules[*]} failed" >&2
  else
    echo "slurm/env.sh: warning: no 'module' command; skipped ${_mtp_occ_modules[*]}" >&2
  fi
fi
unset _mtp_occ_modules

# ---- storage: caches every job of a sweep must share (a shared filesystem on a real cluster) ---------
# The pre-trained base model is cached under MTP_OCC_CACHE behind a file lock: jobs of one sweep reuse one.
# export MTP_OCC_CACHE=/shared/$USER/mtp_occ_cache
# export HF_HOME=/shared/$USER/hf_home
# export MTP_OCC_DATA=/shared/$USER/mtp_occ_data
# Compute nodes without internet: log offline and `wandb sync` from the login node later.
# export WANDB_MODE=offline

# ---- NCCL (multi-GPU / multi-node); the commented values depend on the fabric ------------------------
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung collective fails the job
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# export NCCL_SOCKET_IFNAME=ib0        # the interface the nodes reach each other on
# export NCCL_IB_HCA=mlx5              # InfiniBand adapters to use
# Preemption: submitit and mtp_occ.preempt use SIGUSR2 (SUBMITIT_PREEMPT_SIGNAL); keep it off USR1,
# which NCCL may catch.

# ---- inside a job only: threads and the torch.distributed rendezvous ---------------------------------
if [ -n "${SLURM_JOB_ID:-}" ]; then
  # one compute thread per CPU SLURM gave the task (without this, torch uses every core of the node)
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"; fi
  # the first node hosts the rendezvous; the port comes from the job id, like
  # mtp_occ.preempt.dist_env_from_slurm (12000 + id mod 20000), so concurrent jobs on a node differ
  if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)"
    export MASTER_ADDR
  fi
  export MASTER_PORT="${MASTER_PORT:-$((12000 + SLURM_JOB_ID % 20000))}"
  echo "slurm/env.sh: job $SLURM_JOB_ID on ${SLURM_JOB_NODELIST:-?}, MASTER_ADDR=${MASTER_ADDR:-?}:$MASTER_PORT," \
       "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >&2
fi
