// Shared declarations of the CUDA selective scan: launch parameters and the kernel-launch entry points.
//
// Layouts (all contiguous, row-major):
//   u, delta          (batch, channels, seqlen)          input_t  (float, double, half or bfloat16)
//   A                 (channels, dstate)                 acc_t    (float; double for double inputs)
//   B, C              (batch, groups, dstate, seqlen)    input_t
//   D, delta_bias     (channels) or absent               acc_t
//   y, dy             (batch, channels, seqlen)          acc_t
//   states            (batch, channels, n_chunks, dstate) acc_t: the state h entering each time chunk
// where channels = groups * channels_per_group and channel c belongs to group c / channels_per_group.
#pragma once

#include <cuda_runtime.h>

#include <c10/core/ScalarType.h>

namespace defmamba_scan {

// Time steps per chunk: the kernels stage one chunk of every input in shared memory. The state entering each chunk
// is saved by the forward pass so that the backward pass recomputes states one chunk at a time.
constexpr int kChunkFloat = 32;
constexpr int kChunkDouble = 16;

inline int chunk_len(c10::ScalarType input_type) {
  return input_type == c10::ScalarType::Double ? kChunkDouble : kChunkFloat;
}

struct ScanSizes {
  int batch;
  int channels;
  int groups;
  int channels_per_group;
  int dstate;
  int seqlen;
  int n_chunks;
};

struct FwdParams {
  ScanSizes sizes;
  bool softplus;
  const void* u;
  const void* delta;
  const void* A;
  const void* B;
  const void* C;
  const void* D;           // nullptr when absent
  const void* delta_bias;  // nullptr when absent
  void* y;
  void* states;            // nullptr: states are not saved (no backward will follow)
};

struct BwdParams {
  ScanSizes sizes;
  bool softplus;
  bool deterministic;       // true: dB/dC per-block partials reduced later in a fixed order; false: float atomics
  int blocks_per_group;     // channel blocks that share one group (the partial count in deterministic mode)
  const void* u;
  const void* delta;
  const void* A;
  const void* B;
  const void* C;
  const void* D;
  const void* delta_bias;
  const void* dy;
  const void* states;
  void* du;                 // input_t, like u
  void* ddelta;             // input_t, like delta
  void* dA_part;            // acc_t (batch, channels, dstate): per-sample partials
  void* dB;                 // acc_t (batch, groups, dstate, seqlen), or (batch, groups, blocks_per_group, dstate,
  void* dC;                 //   seqlen) partials in deterministic mode; same for dC
  void* dD_part;            // acc_t (batch, channels)
  void* dbias_part;         // acc_t (batch, channels)
};

// Threads per block: each block scans kThreads / lanes channels of one group for one batch element, and each channel
// uses `lanes` threads (one per state, lanes = dstate rounded up to 16 or 32).
constexpr int kThreads = 128;

inline int lanes_for(int dstate) { return dstate <= 16 ? 16 : 32; }

inline int blocks_per_group(int channels_per_group, int dstate) {
  const int channels_per_block = kThreads / lanes_for(dstate);
  return (channels_per_group + channels_per_block - 1) / channels_per_block;
}

void launch_scan_fwd(const FwdParams& params, c10::ScalarType input_type, cudaStream_t stream);
void launch_scan_bwd(const BwdParams& params, c10::ScalarType input_type, cudaStream_t stream);

}  // namespace defmamba_scan
