// C entry points to the emulated selective-scan kernels for ctypes (tests/test_selective_scan_cuda.py). Sizes are
// (batch, channels, groups, channels_per_group, dstate, seqlen, n_chunks); pointers follow the field order of
// FwdParams / BwdParams in scan_cuda_common.h, nullptr for an absent D / delta_bias.
#include "scan_cuda_common.h"

namespace {
const c10::ScalarType kInputTypes[] = {c10::ScalarType::Float, c10::ScalarType::Double, c10::ScalarType::Half,
                                       c10::ScalarType::BFloat16};

defmamba_scan::ScanSizes sizes_from(const int* s) { return {s[0], s[1], s[2], s[3], s[4], s[5], s[6]}; }
}  // namespace

extern "C" void emulated_scan_fwd(int input_type, const int* sizes, int softplus, void* const* ptr) {
  defmamba_scan::FwdParams p{};
  p.sizes = sizes_from(sizes);
  p.softplus = softplus != 0;
  p.u = ptr[0];
  p.delta = ptr[1];
  p.A = ptr[2];
  p.B = ptr[3];
  p.C = ptr[4];
  p.D = ptr[5];
  p.delta_bias = ptr[6];
  p.y = ptr[7];
  p.states = ptr[8];
  defmamba_scan::launch_scan_fwd(p, kInputTypes[input_type], nullptr);
}

extern "C" void emulated_scan_bwd(int input_type, const int* sizes, int softplus, int deterministic,
                                  int blocks_per_group, void* const* ptr) {
  defmamba_scan::BwdParams p{};
  p.sizes = sizes_from(sizes);
  p.softplus = softplus != 0;
  p.deterministic = deterministic != 0;
  p.blocks_per_group = blocks_per_group;
  p.u = ptr[0];
  p.delta = ptr[1];
  p.A = ptr[2];
  p.B = ptr[3];
  p.C = ptr[4];
  p.D = ptr[5];
  p.delta_bias = ptr[6];
  p.dy = ptr[7];
  p.states = ptr[8];
  p.du = ptr[9];
  p.ddelta = ptr[10];
  p.dA_part = ptr[11];
  p.dB = ptr[12];
  p.dC = ptr[13];
  p.dD_part = ptr[14];
  p.dbias_part = ptr[15];
  defmamba_scan::launch_scan_bwd(p, kInputTypes[input_type], nullptr);
}
