// Forward selective scan.
//
// One block per (channel block, group, batch element). Thread (channel j of the block, lane n) owns the state h[n] of
// one channel. Time runs in chunks of kChunk steps: the block stages dt = softplus(delta + delta_bias), dt * u and the
// group's B, C columns of the chunk in shared memory (coalesced loads along the sequence), every thread advances its
// state sequentially through the chunk, the per-step outputs are summed over the lanes of a channel with a warp-shuffle
// reduce-scatter (one group of steps at a time), and the chunk of y is written back coalesced. The state entering
// each chunk is saved for the backward.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "scan_cuda_device.cuh"

namespace defmamba_scan {
namespace {

template <typename input_t, int lanes>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(const FwdParams p) {
  using acc_t = typename AccType<input_t>::type;
  constexpr int kChannels = kThreads / lanes;
  constexpr int kChunk = ChunkLen<acc_t>::value;
  constexpr int kGroup = kChunk < lanes ? kChunk : lanes;  // steps whose y are summed over lanes together
  // Rows padded by one element so that column-wise accesses hit distinct shared-memory banks.
  __shared__ acc_t s_dt[kChannels][kChunk + 1];
  __shared__ acc_t s_dtu[kChannels][kChunk + 1];
  __shared__ acc_t s_u[kChannels][kChunk + 1];
  __shared__ acc_t s_y[kChannels][kChunk + 1];
  __shared__ acc_t s_B[kChunk][lanes + 1];
  __shared__ acc_t s_C[kChunk][lanes + 1];

  const ScanSizes& sz = p.sizes;
  const int tid = threadIdx.x;
  const int lane = tid % lanes;
  const int local_channel = tid / lanes;
  const int block_in_group = blockIdx.x;
  const int group = blockIdx.y;
  const int batch = blockIdx.z;
  const int first_in_group = block_in_group * kChannels;  // index within the group of the block's channel 0
  const int channel0 = group * sz.channels_per_group + first_in_group;
  const int channel = channel0 + local_channel;
  const bool channel_ok = first_in_group + local_channel < sz.channels_per_group;
  const bool state_ok = channel_ok && lane < sz.dstate;

  const input_t* u = static_cast<const input_t*>(p.u) + (int64_t(batch) * sz.channels + channel0) * sz.seqlen;
  const input_t* delta = static_cast<const input_t*>(p.delta) + (int64_t(batch) * sz.channels + channel0) * sz.seqlen;
  const input_t* Bg = static_cast<const input_t*>(p.B) + (int64_t(batch) * sz.groups + group) * sz.dstate * sz.seqlen;
  const input_t* Cg = static_cast<const input_t*>(p.C) + (int64_t(batch) * sz.groups + group) * sz.dstate * sz.seqlen;
  const acc_t* A = static_cast<const acc_t*>(p.A);
  const acc_t* D = static_cast<const acc_t*>(p.D);
  const acc_t* delta_bias = static_cast<const acc_t*>(p.delta_bias);
  acc_t* y = static_cast<acc_t*>(p.y) + (int64_t(batch) * sz.channels + channel0) * sz.seqlen;
  acc_t* states = static_cast<acc_t*>(p.states);

  // Padded lanes and channels get A = 0, B = C = 0 and dt = 0: their state stays 0 and contributes nothing.
  const acc_t A_n = state_ok ? A[int64_t(channel) * sz.dstate + lane] : acc_t(0);
  acc_t h = 0;

  for (int chunk = 0; chunk < sz.n_chunks; ++chunk) {
    const int t0 = chunk * kChunk;
    if (states != nullptr && state_ok) {
      states[((int64_t(batch) * sz.channels + channel) * sz.n_chunks + chunk) * sz.dstate + lane] = h;
    }
    for (int e = tid; e < kChannels * kChunk; e += kThreads) {
      const int j = e / kChunk;
      const int t = e % kChunk;
      acc_t dt = 0;
      acc_t u_t = 0;
      if (first_in_group + j < sz.channels_per_group && t0 + t < sz.seqlen) {
        const int64_t offset = int64_t(j) * sz.seqlen + t0 + t;
        dt = to_acc<acc_t>(delta[offset]);
        if (delta_bias != nullptr) dt += delta_bias[channel0 + j];
        if (p.softplus) dt = softplus(dt);
        u_t = to_acc<acc_t>(u[offset]);
      }
      s_dt[j][t] = dt;
      s_dtu[j][t] = dt * u_t;
      s_u[j][t] = u_t;
    }
    for (int e = tid; e < lanes * kChunk; e += kThreads) {
      const int n = e / kChunk;
      const int t = e % kChunk;
      const bool ok = n < sz.dstate && t0 + t < sz.seqlen;
      const int64_t offset = int64_t(n) * sz.seqlen + t0 + t;
      s_B[t][n] = ok ? to_acc<acc_t>(Bg[offset]) : acc_t(0);
      s_C[t][n] = ok ? to_acc<acc_t>(Cg[offset]) : acc_t(0);
    }
    __syncthreads();

#pragma unroll
    for (int t0_group = 0; t0_group < kChunk; t0_group += kGroup) {
      acc_t y_parts[kGroup];  // this lane's term of y at each step of the group
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int t = t0_group + i;
        h = decay_exp(s_dt[local_channel][t] * A_n) * h + s_B[t][lane] * s_dtu[local_channel][t];
        y_parts[i] = s_C[t][lane] * h;
      }
      const acc_t y_t = lane_sum_scatter<lanes, kGroup>(y_parts, lane);
      if (lane < kGroup) s_y[local_channel][t0_group + lane] = y_t;
    }
    __syncthreads();

    for (int e = tid; e < kChannels * kChunk; e += kThreads) {
      const int j = e / kChunk;
      const int t = e % kChunk;
      if (first_in_group + j < sz.channels_per_group && t0 + t < sz.seqlen) {
        const acc_t skip = D != nullptr ? D[channel0 + j] * s_u[j][t] : acc_t(0);
        y[int64_t(j) * sz.seqlen + t0 + t] = s_y[j][t] + skip;
      }
    }
    __syncthreads();
  }
}

template <typename input_t, int lanes>
void launch(const FwdParams& params, cudaStream_t stream) {
  const ScanSizes& sz = params.sizes;
  const dim3 grid(blocks_per_group(sz.channels_per_group, sz.dstate), sz.groups, sz.batch);
  scan_fwd_kernel<input_t, lanes><<<grid, kThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename input_t>
void launch_lanes(const FwdParams& params, cudaStream_t stream) {
  if (lanes_for(params.sizes.dstate) == 16) {
    launch<input_t, 16>(params, stream);
  } else {
    launch<input_t, 32>(params, stream);
  }
}

}  // namespace

void launch_scan_fwd(const FwdParams& params, c10::ScalarType input_type, cudaStream_t stream) {
  switch (input_type) {
    case c10::ScalarType::Float:
      return launch_lanes<float>(params, stream);
    case c10::ScalarType::Double:
      return launch_lanes<double>(params, stream);
    case c10::ScalarType::Half:
      return launch_lanes<c10::Half>(params, stream);
    case c10::ScalarType::BFloat16:
      return launch_lanes<c10::BFloat16>(params, stream);
    default:
      TORCH_CHECK(false, "selective scan (cuda): unsupported input dtype ", input_type);
  }
}

}  // namespace defmamba_scan
