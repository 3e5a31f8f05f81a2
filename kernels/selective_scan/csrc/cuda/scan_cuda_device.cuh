// Device helpers shared by the forward and backward kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "scan_cuda_common.h"

namespace defmamba_scan {

// Accumulation type: float for float/half/bfloat16 inputs, double for double inputs.
template <typename input_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename acc_t>
struct ChunkLen {
  static constexpr int value = kChunkFloat;
};
template <>
struct ChunkLen<double> {
  static constexpr int value = kChunkDouble;
};

// Above this pre-activation softplus(x) is taken as x (and its derivative as 1), like torch.nn.functional.softplus.
constexpr float kSoftplusThreshold = 20.0f;

// The decays exp(dt * A), N per step and channel, take the hardware exponential: __expf is ex2.approx of
// x * log2(e) rounded to float, within 2 + 1.173 |x| ulp (CUDA's bound). Most of that is the rounding of the product,
// |x| / 2 to |x| ulp, the size of the rounding already in x = dt * A; correcting it (exp_acc) would cost the hot loop.
__device__ __forceinline__ float decay_exp(float x) { return __expf(x); }
__device__ __forceinline__ double decay_exp(double x) { return exp(x); }

// exp for softplus and its derivative, once per step and channel: exp(x) = 2^t * 2^lost with t = x * log2(e) rounded
// to float and `lost` its rounding error (exact by fma, plus x times the constant's), put back to first order. Leaves
// ex2.approx's ~2 ulp, where __expf is off by up to |x| ulp (17 at x = -30 in the tests). For |t| >= 126: 0, inf or
// NaN as ex2 gives them.
__device__ __forceinline__ float exp_acc(float x) {
  constexpr float kLog2e = 1.44269504f;        // log2(e) rounded to float
  constexpr float kLog2eLow = 1.92596299e-8f;  // log2(e) - kLog2e
  constexpr float kLn2 = 0.693147181f;
  const float t = x * kLog2e;
  const float p = exp2f(t);  // ex2.approx.ftz under --use_fast_math
  const float lost = fmaf(x, kLog2e, -t) + x * kLog2eLow;
  return fabsf(t) < 126.0f ? fmaf(p, lost * kLn2, p) : p;  // p * (1 + lost ln 2), without rounding 1 + lost ln 2
}
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t softplus(acc_t x) {
  return x > acc_t(kSoftplusThreshold) ? x : log1p(exp_acc(x));
}

// 1 / x correctly rounded: under --use_fast_math a float division is an approximate reciprocal (~1 ulp more).
__device__ __forceinline__ float reciprocal(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double reciprocal(double x) { return 1.0 / x; }

// d softplus(x) / dx = sigmoid(x), and 1 above the threshold.
template <typename acc_t>
__device__ __forceinline__ acc_t softplus_grad(acc_t x) {
  return x > acc_t(kSoftplusThreshold) ? acc_t(1) : reciprocal(acc_t(1) + exp_acc(-x));
}

// Loads an input element in the accumulation type (c10::Half and c10::BFloat16 convert on the device).
template <typename acc_t, typename input_t>
__device__ __forceinline__ acc_t to_acc(input_t x) {
  return static_cast<acc_t>(x);
}

// Sum over the `lanes` consecutive threads of one channel (a power of two dividing the warp); every lane gets the sum.
template <int lanes, typename acc_t>
__device__ __forceinline__ acc_t lane_sum(acc_t value) {
#pragma unroll
  for (int offset = lanes / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset, lanes);
  }
  return value;
}

// For `steps` per-step partial values per lane (steps divides lanes), returns in lane l the sum over the channel's
// lanes of the partials of step l % steps. A butterfly reduce-scatter: at each offset below `steps` a lane keeps the
// half of its values whose step has the lane's bit, and adds the partner's copy of that half, so the whole takes
// (lanes / steps - 1) * steps + steps - 1 shuffles instead of steps * log2(lanes).
template <int lanes, int steps, typename acc_t>
__device__ __forceinline__ acc_t lane_sum_scatter(acc_t (&values)[steps], int lane) {
  static_assert(lanes % steps == 0, "steps must divide lanes");
#pragma unroll
  for (int offset = lanes / 2; offset >= steps; offset /= 2) {
#pragma unroll
    for (int i = 0; i < steps; ++i) values[i] += __shfl_xor_sync(0xffffffffu, values[i], offset, lanes);
  }
#pragma unroll
  for (int offset = steps / 2; offset > 0; offset /= 2) {
    const bool upper = (lane & offset) != 0;
#pragma unroll
    for (int i = 0; i < offset; ++i) {
      const acc_t send = upper ? values[i] : values[i + offset];
      const acc_t keep = upper ? values[i + offset] : values[i];
      values[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset, lanes);
    }
  }
  return values[0];
}

}  // namespace defmamba_scan
