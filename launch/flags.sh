# shellcheck shell=bash
# Recommended XLA / runtime flags for multi-device training. Sourced by launch/tpu_pod.sh and
# launch/slurm.sbatch; use it by hand the same way:
#   source launch/flags.sh && iv2_flags gpu            # XLA_FLAGS, NCCL and allocator variables
#   source launch/flags.sh && iv2_flags tpu v5p-256    # LIBTPU_INIT_ARGS (accelerator type optional)
# Your settings win: a flag already named in XLA_FLAGS / LIBTPU_INIT_ARGS (any value, e.g.
# --xla_gpu_enable_pipelined_all_gather=false) is kept and ours is skipped; the rest are
# appended. Other variables are set only when unset. IV2_NO_DEFAULT_FLAGS=1 sets nothing.
# Unknown flags are fatal (XLA: "Unknown flag in XLA_FLAGS", libtpu: "Unknown command line
# flag"), so every flag below was checked against jax/jaxlib 0.12.0.1 and libtpu 0.0.52.

# _iv2_append VAR FLAG...: appends each --name=value to $VAR unless $VAR already names --name.
_iv2_append() {
  local var=$1 cur flag name
  shift
  cur=${!var:-}
  for flag in "$@"; do
    name=${flag%%=*}
    case " $cur " in *" $name="* | *" $name "*) continue ;; esac
    cur="${cur:+$cur }$flag"
  done
  export "$var=$cur"
}

# _iv2_default VAR VALUE: exports VAR=VALUE unless VAR is already set (even to "").
_iv2_default() {
  if [ -z "${!1+x}" ]; then export "$1=$2"; fi
}

iv2_flags() {
  local platform=${1:-} accel=${2:-${IV2_TPU_TYPE:-${TPU_ACCELERATOR_TYPE:-}}}
  if [ "${IV2_NO_DEFAULT_FLAGS:-0}" = 1 ]; then
    echo "iv2_flags: IV2_NO_DEFAULT_FLAGS=1, leaving the environment as it is" >&2
    return 0
  fi
  case $platform in
    gpu)
      local xla=(
        # Reorders the schedule so collectives run while independent compute proceeds.
        --xla_gpu_enable_latency_hiding_scheduler=true
        # Puts collectives on a high-priority CUDA stream so compute kernels do not starve them.
        --xla_gpu_enable_highest_priority_async_stream=true
        # Combines small gradient all-reduces (data axis) into few large NCCL calls (<= 1 GiB).
        --xla_gpu_all_reduce_combine_threshold_bytes=1073741824
        # Combines FSDP parameter all-gathers up to ~one 6B layer in bf16 (256 MiB) per call.
        --xla_gpu_all_gather_combine_threshold_bytes=268435456
        # Combines FSDP gradient reduce-scatters the same way (128 MiB per call).
        --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
        # Scanned layers (nn.scan): gathers the next layer's weights during this layer's compute
        # (costs one extra layer of gathered weights in memory).
        --xla_gpu_enable_pipelined_all_gather=true
        # Scanned layers: reduce-scatters a layer's gradients during the next layer's backward.
        --xla_gpu_enable_pipelined_reduce_scatter=true
        # Scanned layers: the same for data-parallel gradient all-reduces.
        --xla_gpu_enable_pipelined_all_reduce=true
        # Unrolls scan loops by two so the pipelined collectives above can overlap across steps.
        --xla_gpu_enable_while_loop_double_buffering=true
      )
      # Not set: --xla_gpu_enable_triton_gemm=false (cuBLAS vs Triton GEMMs: measure first).
      _iv2_append XLA_FLAGS "${xla[@]}"
      # Lets XLA preallocate 92% of each GPU's memory (default 75%); lower it if NCCL or cuDNN
      # run out of memory outside XLA's pool.
      _iv2_default XLA_PYTHON_CLIENT_MEM_FRACTION .92
      # Hides C++ INFO lines from XLA / the CUDA plugin; warnings and errors stay.
      _iv2_default TF_CPP_MIN_LOG_LEVEL 1
      # NCCL prints its warnings (e.g. why a communicator did not come up), not its INFO chatter.
      _iv2_default NCCL_DEBUG WARN
      # Left to the site: NCCL_IB_HCA / NCCL_IB_GID_INDEX / NCCL_SOCKET_IFNAME (fabric); NCCL_NVLS_ENABLE
      # (NVLink SHARP, NCCL's default is on where supported; =0 frees its memory if you OOM);
      # CUDA_DEVICE_MAX_CONNECTIONS=1 (helps overlap on Hopper, not recommended on Blackwell).
      echo "iv2_flags: gpu: XLA_FLAGS=$XLA_FLAGS" >&2
      ;;
    tpu)
      local tpu=(
        # Reorders the schedule so collectives run while independent compute proceeds.
        --xla_tpu_enable_latency_hiding_scheduler=true
        # Runs asynchronous collectives as "continuation fusions" overlapped with compute.
        --xla_tpu_enable_async_collective_fusion=true
        # Lets one continuation fusion span several compute steps (longer overlap windows).
        --xla_tpu_enable_async_collective_fusion_multiple_steps=true
        # Overlaps those collectives with compute on the TensorCore itself.
        --xla_tpu_overlap_compute_collective_tc=true
        # Makes all-gathers (the FSDP parameter gathers) asynchronous.
        --xla_enable_async_all_gather=true
      )
      case $accel in
        v5litepod-* | v5e-* | v5e)
          # Fuses all-gathers into those continuation fusions (MaxText's FSDP setting). libtpu
          # 0.0.52 refuses it on v4 / v5p / v6e ("Continuation fusion for AllGather ... not
          # supported/recommended on platforms other than TPU v5e"), so only on v5e.
          tpu+=(--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true)
          ;;
      esac
      _iv2_append LIBTPU_INIT_ARGS "${tpu[@]}"
      echo "iv2_flags: tpu${accel:+ ($accel)}: LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS" >&2
      ;;
    *)
      echo "usage: iv2_flags gpu|tpu [TPU accelerator type, e.g. v5p-256]" >&2
      return 2
      ;;
  esac
}
