// Backward selective scan.
//
// Same block layout as the forward. Chunks are visited from the last to the first. For each chunk the block stages
// dt, u, dy, B, C in shared memory, every thread recomputes its states h_t inside the chunk from the state saved by the
// forward (kept in registers), then runs the reverse recurrence of the state gradient
//     g_t = C_t * dy_t + exp(dt_{t+1} A) * g_{t+1}
// and forms the gradients:
//     du_t    = sum_n g_t[n] dt_t B_t[n] + D dy_t
//     ddt_t   = sum_n g_t[n] (B_t[n] u_t + A[n] exp(dt_t A[n]) h_{t-1}[n])
//     dA[n]  += g_t[n] dt_t exp(dt_t A[n]) h_{t-1}[n]
//     dB_t[n] = sum over the group's channels of g_t[n] dt_t u_t,   dC_t[n] = sum over channels of dy_t h_t[n]
// The sums over n use a warp-shuffle reduce-scatter; the sums of dB, dC over the block's channels use shared memory
// in a fixed order.
// Across the blocks of a group they are either added with float atomics or, in deterministic mode, written as
// per-block partials that the host reduces in a fixed order. dA, dD and ddelta_bias are written per batch element
// and reduced over the batch on the host, so they never need atomics.
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "scan_cuda_device.cuh"

namespace defmamba_scan {
namespace {

template <typename input_t, int lanes>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(const BwdParams p) {
  using acc_t = typename AccType<input_t>::type;
  constexpr int kChannels = kThreads / lanes;
  constexpr int kChunk = ChunkLen<acc_t>::value;
  constexpr int kGroup = kChunk < lanes ? kChunk : lanes;  // steps whose du, d dt are summed over lanes together
  __shared__ acc_t s_dt[kChannels][kChunk + 1];
  __shared__ acc_t s_u[kChannels][kChunk + 1];
  __shared__ acc_t s_dy[kChannels][kChunk + 1];
  __shared__ acc_t s_dt_grad[kChannels][kChunk + 1];  // d dt / d delta (softplus derivative, 1, or 0 on padding)
  __shared__ acc_t s_du[kChannels][kChunk + 1];
  __shared__ acc_t s_ddelta[kChannels][kChunk + 1];
  __shared__ acc_t s_B[kChunk][lanes + 1];
  __shared__ acc_t s_C[kChunk][lanes + 1];
  __shared__ acc_t s_dB[kChunk][kThreads + 1];  // per-thread terms, summed over the block's channels after the chunk
  __shared__ acc_t s_dC[kChunk][kThreads + 1];

  const ScanSizes& sz = p.sizes;
  const int tid = threadIdx.x;
  const int lane = tid % lanes;
  const int local_channel = tid / lanes;
  const int block_in_group = blockIdx.x;
  const int group = blockIdx.y;
  const int batch = blockIdx.z;
  const int first_in_group = block_in_group * kChannels;
  const int channel0 = group * sz.channels_per_group + first_in_group;
  const int channel = channel0 + local_channel;
  const bool channel_ok = first_in_group + local_channel < sz.channels_per_group;
  const bool state_ok = channel_ok && lane < sz.dstate;

  const int64_t row0 = (int64_t(batch) * sz.channels + channel0) * sz.seqlen;
  const int64_t group_row = (int64_t(batch) * sz.groups + group) * sz.dstate * sz.seqlen;
  const input_t* u = static_cast<const input_t*>(p.u) + row0;
  const input_t* delta = static_cast<const input_t*>(p.delta) + row0;
  const acc_t* dy = static_cast<const acc_t*>(p.dy) + row0;
  const input_t* Bg = static_cast<const input_t*>(p.B) + group_row;
  const input_t* Cg = static_cast<const input_t*>(p.C) + group_row;
  const acc_t* A = static_cast<const acc_t*>(p.A);
  const acc_t* D = static_cast<const acc_t*>(p.D);
  const acc_t* delta_bias = static_cast<const acc_t*>(p.delta_bias);
  const acc_t* states = static_cast<const acc_t*>(p.states);
  input_t* du = static_cast<input_t*>(p.du) + row0;
  input_t* ddelta = static_cast<input_t*>(p.ddelta) + row0;
  acc_t* dB = static_cast<acc_t*>(p.dB);
  acc_t* dC = static_cast<acc_t*>(p.dC);
  // Where this block's dB/dC rows start: the group's rows (atomic mode) or the block's partial rows (deterministic).
  const int64_t grad_row0 =
      p.deterministic
          ? ((int64_t(batch) * sz.groups + group) * p.blocks_per_group + block_in_group) * sz.dstate * sz.seqlen
          : group_row;

  const acc_t A_n = state_ok ? A[int64_t(channel) * sz.dstate + lane] : acc_t(0);
  const acc_t D_c = (D != nullptr && channel_ok) ? D[channel] : acc_t(0);
  acc_t carry = 0;  // exp(dt_{t+1} A) * g_{t+1} entering the chunk from the one after it
  acc_t dA_sum = 0;
  acc_t dD_sum = 0;
  acc_t dbias_sum = 0;
  acc_t hs[kChunk];  // h_t of the current chunk

  for (int chunk = sz.n_chunks - 1; chunk >= 0; --chunk) {
    const int t0 = chunk * kChunk;
    for (int e = tid; e < kChannels * kChunk; e += kThreads) {
      const int j = e / kChunk;
      const int t = e % kChunk;
      acc_t dt = 0;
      acc_t dt_grad = 0;
      acc_t u_t = 0;
      acc_t dy_t = 0;
      if (first_in_group + j < sz.channels_per_group && t0 + t < sz.seqlen) {
        const int64_t offset = int64_t(j) * sz.seqlen + t0 + t;
        dt = to_acc<acc_t>(delta[offset]);
        if (delta_bias != nullptr) dt += delta_bias[channel0 + j];
        dt_grad = 1;
        if (p.softplus) {
          dt_grad = softplus_grad(dt);
          dt = softplus(dt);
        }
        u_t = to_acc<acc_t>(u[offset]);
        dy_t = dy[offset];
      }
      s_dt[j][t] = dt;
      s_dt_grad[j][t] = dt_grad;
      s_u[j][t] = u_t;
      s_dy[j][t] = dy_t;
    }
    for (int e = tid; e < lanes * kChunk; e += kThreads) {
      const int n = e / kChunk;
      const int t = e % kChunk;
      const bool ok = n < sz.dstate && t0 + t < sz.seqlen;
      const int64_t offset = int64_t(n) * sz.seqlen + t0 + t;
      s_B[t][n] = ok ? to_acc<acc_t>(Bg[offset]) : acc_t(0);
      s_C[t][n] = ok ? to_acc<acc_t>(Cg[offset]) : acc_t(0);
    }
    const acc_t h_start =
        state_ok ? states[((int64_t(batch) * sz.channels + channel) * sz.n_chunks + chunk) * sz.dstate + lane]
                 : acc_t(0);
    __syncthreads();

    acc_t h = h_start;
#pragma unroll
    for (int t = 0; t < kChunk; ++t) {
      const acc_t dt = s_dt[local_channel][t];
      h = decay_exp(dt * A_n) * h + s_B[t][lane] * (dt * s_u[local_channel][t]);  // as the forward rounds it
      hs[t] = h;
    }

#pragma unroll
    for (int t0_group = kChunk - kGroup; t0_group >= 0; t0_group -= kGroup) {
      acc_t du_parts[kGroup];   // this lane's terms of du and d dt at each step of the group
      acc_t ddt_parts[kGroup];
#pragma unroll
      for (int i = kGroup - 1; i >= 0; --i) {
        const int t = t0_group + i;
        const acc_t dt = s_dt[local_channel][t];
        const acc_t u_t = s_u[local_channel][t];
        const acc_t dy_t = s_dy[local_channel][t];
        const acc_t B_n = s_B[t][lane];
        const acc_t decay = decay_exp(dt * A_n);
        const acc_t h_prev = t > 0 ? hs[t - 1] : h_start;
        const acc_t g = s_C[t][lane] * dy_t + carry;
        const acc_t decay_grad = g * decay * h_prev;  // d loss / d (dt * A) through the decay
        s_dB[t][tid] = g * dt * u_t;
        s_dC[t][tid] = dy_t * hs[t];
        dA_sum += decay_grad * dt;
        carry = decay * g;
        du_parts[i] = g * dt * B_n;
        ddt_parts[i] = g * B_n * u_t + decay_grad * A_n;
      }
      // Lane l (< kGroup) finishes step t0_group + l.
      const acc_t du_sum = lane_sum_scatter<lanes, kGroup>(du_parts, lane);
      const acc_t ddt_sum = lane_sum_scatter<lanes, kGroup>(ddt_parts, lane);
      if (lane < kGroup) {
        const int t = t0_group + lane;
        const acc_t dy_t = s_dy[local_channel][t];
        const acc_t ddelta_t = ddt_sum * s_dt_grad[local_channel][t];
        s_du[local_channel][t] = du_sum + D_c * dy_t;
        s_ddelta[local_channel][t] = ddelta_t;
        dD_sum += dy_t * s_u[local_channel][t];
        dbias_sum += ddelta_t;
      }
    }
    __syncthreads();

    for (int e = tid; e < kChannels * kChunk; e += kThreads) {
      const int j = e / kChunk;
      const int t = e % kChunk;
      if (first_in_group + j < sz.channels_per_group && t0 + t < sz.seqlen) {
        const int64_t offset = int64_t(j) * sz.seqlen + t0 + t;
        du[offset] = static_cast<input_t>(s_du[j][t]);
        ddelta[offset] = static_cast<input_t>(s_ddelta[j][t]);
      }
    }
    for (int e = tid; e < sz.dstate * kChunk; e += kThreads) {
      const int n = e / kChunk;
      const int t = e % kChunk;
      if (t0 + t < sz.seqlen) {
        acc_t dB_sum = 0;
        acc_t dC_sum = 0;
#pragma unroll
        for (int j = 0; j < kChannels; ++j) {
          dB_sum += s_dB[t][j * lanes + n];
          dC_sum += s_dC[t][j * lanes + n];
        }
        const int64_t offset = grad_row0 + int64_t(n) * sz.seqlen + t0 + t;
        if (p.deterministic) {
          dB[offset] = dB_sum;
          dC[offset] = dC_sum;
        } else {
          atomicAdd(dB + offset, dB_sum);
          atomicAdd(dC + offset, dC_sum);
        }
      }
    }
    __syncthreads();
  }

  if (state_ok) {
    static_cast<acc_t*>(p.dA_part)[(int64_t(batch) * sz.channels + channel) * sz.dstate + lane] = dA_sum;
  }
  // Each lane summed the steps it finished; all lanes take part in the shuffles.
  dD_sum = lane_sum<lanes>(dD_sum);
  dbias_sum = lane_sum<lanes>(dbias_sum);
  if (channel_ok && lane == 0) {
    static_cast<acc_t*>(p.dD_part)[int64_t(batch) * sz.channels + channel] = dD_sum;
    static_cast<acc_t*>(p.dbias_part)[int64_t(batch) * sz.channels + channel] = dbias_sum;
  }
}

template <typename input_t, int lanes>
void launch(const BwdParams& params, cudaStream_t stream) {
  const ScanSizes& sz = params.sizes;
  const dim3 grid(params.blocks_per_group, sz.groups, sz.batch);
  scan_bwd_kernel<input_t, lanes><<<grid, kThreads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename input_t>
void launch_lanes(const BwdParams& params, cudaStream_t stream) {
  if (lanes_for(params.sizes.dstate) == 16) {
    launch<input_t, 16>(params, stream);
  } else {
    launch<input_t, 32>(params, stream);
  }
}

}  // namespace

void launch_scan_bwd(const BwdParams& params, c10::ScalarType input_type, cudaStream_t stream) {
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
