// Raw-pointer views of the selective-scan tensors, shared by the torch binding (scan_cpu.cpp) and the per-ISA kernel
// translation units (scan_generic.cpp, scan_avx2.cpp). No torch headers here: the kernel units are compiled with
// their own target flags and must not instantiate any inline code that the binding also uses.
#pragma once

#include <cstdint>

namespace defmamba_scan {

// Time steps between two saved states: the forward stores h at t = 0, kChunk, 2 * kChunk, ... and the backward
// recomputes the states of one chunk at a time from them (a (kChunk, N) buffer that stays in L1).
constexpr int64_t kChunk = 64;

// Shapes: u, delta, y (batch, channels, len); A (channels, nstate); Bt, Ct (batch, groups, len, nstate), i.e. B and C
// transposed so that the nstate values of one time step are contiguous; D, delta_bias (channels) or nullptr;
// checkpoints (batch, channels, ceil(len / kChunk), nstate) or nullptr. All contiguous.
template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* u;
  const scalar_t* delta;
  const scalar_t* A;
  const scalar_t* Bt;
  const scalar_t* Ct;
  const scalar_t* D;
  const scalar_t* delta_bias;
  scalar_t* y;
  scalar_t* checkpoints;
  int64_t batch;
  int64_t channels;
  int64_t groups;
  int64_t len;
  int64_t nstate;
  bool delta_softplus;
};

// The backward runs one task per (batch, group, channel block); a block's dB, dC go to its own partial buffer
// (batch, groups, blocks, len, nstate) that the binding sums in a fixed order, and dA, dD, d_delta_bias go to
// per-(batch, channel) partials (batch, channels, nstate) and (batch, channels), summed over batch likewise.
template <typename scalar_t>
struct BackwardArgs {
  ForwardArgs<scalar_t> fwd;  // y unused; checkpoints required
  const scalar_t* dy;
  scalar_t* du;
  scalar_t* ddelta;
  scalar_t* dB_partial;
  scalar_t* dC_partial;
  scalar_t* dA_partial;
  scalar_t* dD_partial;
  scalar_t* ddelta_bias_partial;
  int64_t blocks;  // channel blocks per group
};

inline int64_t num_chunks(int64_t len) { return (len + kChunk - 1) / kChunk; }

// One kernel set per instruction set; `task` indexes (batch, channel) in the forward and (batch, group, block) in the
// backward.
#define DEFMAMBA_SCAN_DECLARE_KERNELS(ns)                                                   \
  namespace ns {                                                                            \
  void forward_task(const ForwardArgs<float>& args, int64_t task);                          \
  void forward_task(const ForwardArgs<double>& args, int64_t task);                         \
  void backward_task(const BackwardArgs<float>& args, int64_t task);                        \
  void backward_task(const BackwardArgs<double>& args, int64_t task);                       \
  }

DEFMAMBA_SCAN_DECLARE_KERNELS(generic)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEFMAMBA_SCAN_HAVE_AVX2 1
DEFMAMBA_SCAN_DECLARE_KERNELS(avx2)
#endif

}  // namespace defmamba_scan
