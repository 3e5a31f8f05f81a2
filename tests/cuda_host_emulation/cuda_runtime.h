// Host emulation of the CUDA features the selective-scan kernels use, so that tests/test_selective_scan_cuda.py can
// run the kernels' own code on the CPU (no GPU, no nvcc): every block runs as kThreads std::threads, shared memory
// becomes function-static storage (blocks run one after another), __syncthreads a barrier of the block, and warp
// shuffles an exchange through per-warp slots between two barriers of the warp. Memory-ordering and timing are not
// emulated; what is checked is the kernels' arithmetic and indexing.
#pragma once

#include <barrier>
#include <math.h>

#include <cmath>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace cuda_host_emulation {
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp_barriers[kMaxWarps];
inline double warp_slots[kMaxWarps][kWarpSize];
inline std::mutex atomic_mutex;
}  // namespace cuda_host_emulation

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;

inline void __syncthreads() { cuda_host_emulation::block_barrier->arrive_and_wait(); }

// Every lane of the warp must call it (as with a full mask on the GPU); width > offset keeps the partner in segment.
template <typename T>
inline T __shfl_xor_sync(unsigned, T value, int offset, int) {
  using namespace cuda_host_emulation;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  warp_slots[warp][lane] = static_cast<double>(value);
  warp_barriers[warp]->arrive_and_wait();
  const T partner_value = static_cast<T>(warp_slots[warp][lane ^ offset]);
  warp_barriers[warp]->arrive_and_wait();
  return partner_value;
}

// As --use_fast_math compiles it: ex2.approx of x * log2(e) rounded to float, with ex2 itself taken as exact here, so
// that the rounding of the product (up to ~|x| / 2 ulp of the result) shows on the host.
inline float __expf(float x) {
  const volatile float scaled = x * 1.44269504f;  // volatile: one float multiply, never fused or widened
  return std::exp2(scaled);
}

inline float __frcp_rn(float x) { return 1.0f / x; }

template <typename T>
inline T atomicAdd(T* address, T value) {
  const std::lock_guard<std::mutex> lock(cuda_host_emulation::atomic_mutex);
  const T old = *address;
  *address = old + value;
  return old;
}

// Replaces `kernel<<<grid, threads, 0, stream>>>(params)`.
template <typename Kernel, typename Params>
void emulated_launch(Kernel kernel, dim3 grid, int threads, const Params& params) {
  using namespace cuda_host_emulation;
  const int warps = threads / kWarpSize;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> block(threads);
        std::vector<std::unique_ptr<std::barrier<>>> warp_owners;
        for (int w = 0; w < warps; ++w) {
          warp_owners.push_back(std::make_unique<std::barrier<>>(kWarpSize));
          warp_barriers[w] = warp_owners.back().get();
        }
        block_barrier = &block;
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(x, y, z);
            kernel(params);
          });
        }
        for (std::thread& thread : pool) thread.join();
      }
    }
  }
}
