# NCCL settings for multi-node A100 training (InfiniBand). Adjust the interface names to your cluster.
export NCCL_IB_DISABLE=0
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-ib0}
export NCCL_ASYNC_ERROR_HANDLING=1          # a failed or hung collective aborts the job ...
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_BLOCKING_WAIT=0
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}       # INFO to debug topology
# ... after distributed.timeout_minutes (the collective timeout passed to init_process_group):
# the rank that times out reports which collective hung instead of waiting forever.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
