// Python bindings of the CUDA selective scan (module `defmamba_scan_cuda`): input checks, output allocation, launch.
//
// fwd(u, delta, A, B, C, D, delta_bias, softplus, save_states) -> [y, states]
// bwd(u, delta, A, B, C, D, delta_bias, dy, states, softplus, deterministic)
//     -> [du, ddelta, dA, dB, dC, dD, ddelta_bias]   (dD / ddelta_bias are None when D / delta_bias are)
// Shapes and dtypes are listed in scan_cuda_common.h; every violation raises a RuntimeError naming the tensor.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <optional>
#include <vector>

#include "scan_cuda_common.h"

namespace defmamba_scan {
namespace {

constexpr int kMaxDstate = 32;

void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype,
                  const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), "selective scan (cuda): ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "selective scan (cuda): ", name, " is on ", t.device(), " but u is on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "selective scan (cuda): ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "selective scan (cuda): ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "selective scan (cuda): ", name, " must be contiguous, got strides ", t.strides());
}

at::ScalarType acc_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks every input and returns the sizes. u fixes the device and the input dtype.
ScanSizes check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.dim() == 3, "selective scan (cuda): u must be (batch, channels, seqlen), got shape ", u.sizes());
  TORCH_CHECK(B.dim() == 4, "selective scan (cuda): B must be (batch, groups, dstate, seqlen), got shape ", B.sizes());
  for (const int64_t size : {u.size(0), u.size(1), u.size(2), B.size(1), B.size(2)}) {
    TORCH_CHECK(size <= std::numeric_limits<int>::max(), "selective scan (cuda): sizes must fit in int32, got u ",
                u.sizes(), " and B ", B.sizes());
  }
  const at::ScalarType input_type = u.scalar_type();
  TORCH_CHECK(input_type == at::kFloat || input_type == at::kDouble || input_type == at::kHalf ||
                  input_type == at::kBFloat16,
              "selective scan (cuda): u must be float32, float64, float16 or bfloat16, got ", input_type);
  ScanSizes sz{};
  sz.batch = static_cast<int>(u.size(0));
  sz.channels = static_cast<int>(u.size(1));
  sz.seqlen = static_cast<int>(u.size(2));
  sz.groups = static_cast<int>(B.size(1));
  sz.dstate = static_cast<int>(B.size(2));
  TORCH_CHECK(sz.batch > 0 && sz.channels > 0 && sz.seqlen > 0,
              "selective scan (cuda): u must be non-empty, got shape ", u.sizes());
  TORCH_CHECK(sz.groups > 0 && sz.channels % sz.groups == 0, "selective scan (cuda): the ", sz.groups,
              " groups of B must divide the ", sz.channels, " channels of u");
  TORCH_CHECK(sz.dstate >= 1 && sz.dstate <= kMaxDstate, "selective scan (cuda): dstate must be in [1, ", kMaxDstate,
              "], got ", sz.dstate);
  TORCH_CHECK(sz.batch <= 65535 && sz.groups <= 65535, "selective scan (cuda): batch and groups must be <= 65535");
  sz.channels_per_group = sz.channels / sz.groups;
  sz.n_chunks = (sz.seqlen + chunk_len(input_type) - 1) / chunk_len(input_type);

  const at::Device device = u.device();
  const at::ScalarType weight_type = acc_type(input_type);
  check_tensor(u, "u", {sz.batch, sz.channels, sz.seqlen}, input_type, device);
  check_tensor(delta, "delta", {sz.batch, sz.channels, sz.seqlen}, input_type, device);
  check_tensor(A, "A", {sz.channels, sz.dstate}, weight_type, device);
  check_tensor(B, "B", {sz.batch, sz.groups, sz.dstate, sz.seqlen}, input_type, device);
  check_tensor(C, "C", {sz.batch, sz.groups, sz.dstate, sz.seqlen}, input_type, device);
  if (D.has_value()) check_tensor(*D, "D", {sz.channels}, weight_type, device);
  if (delta_bias.has_value()) check_tensor(*delta_bias, "delta_bias", {sz.channels}, weight_type, device);
  return sz;
}

const void* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

std::vector<at::Tensor> fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& delta_bias, bool softplus, bool save_states) {
  const ScanSizes sz = check_inputs(u, delta, A, B, C, D, delta_bias);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto acc_options = u.options().dtype(acc_type(u.scalar_type()));
  at::Tensor y = at::empty({sz.batch, sz.channels, sz.seqlen}, acc_options);
  at::Tensor states = save_states ? at::empty({sz.batch, sz.channels, sz.n_chunks, sz.dstate}, acc_options)
                                  : at::empty({0}, acc_options);
  FwdParams params{};
  params.sizes = sz;
  params.softplus = softplus;
  params.u = u.data_ptr();
  params.delta = delta.data_ptr();
  params.A = A.data_ptr();
  params.B = B.data_ptr();
  params.C = C.data_ptr();
  params.D = data_or_null(D);
  params.delta_bias = data_or_null(delta_bias);
  params.y = y.data_ptr();
  params.states = save_states ? states.data_ptr() : nullptr;
  launch_scan_fwd(params, u.scalar_type(), c10::cuda::getCurrentCUDAStream());
  return {y, states};
}

std::vector<at::Tensor> bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const std::optional<at::Tensor>& D,
                            const std::optional<at::Tensor>& delta_bias, const at::Tensor& dy,
                            const at::Tensor& states, bool softplus, bool deterministic) {
  const ScanSizes sz = check_inputs(u, delta, A, B, C, D, delta_bias);
  const at::ScalarType weight_type = acc_type(u.scalar_type());
  check_tensor(dy, "dy", {sz.batch, sz.channels, sz.seqlen}, weight_type, u.device());
  check_tensor(states, "states", {sz.batch, sz.channels, sz.n_chunks, sz.dstate}, weight_type, u.device());
  const c10::cuda::CUDAGuard guard(u.device());
  const auto acc_options = u.options().dtype(weight_type);
  const int n_blocks = blocks_per_group(sz.channels_per_group, sz.dstate);

  at::Tensor du = at::empty_like(u);
  at::Tensor ddelta = at::empty_like(delta);
  at::Tensor dA_part = at::empty({sz.batch, sz.channels, sz.dstate}, acc_options);
  at::Tensor dD_part = at::empty({sz.batch, sz.channels}, acc_options);
  at::Tensor dbias_part = at::empty({sz.batch, sz.channels}, acc_options);
  at::Tensor dB;
  at::Tensor dC;
  if (deterministic) {
    dB = at::empty({sz.batch, sz.groups, n_blocks, sz.dstate, sz.seqlen}, acc_options);
    dC = at::empty({sz.batch, sz.groups, n_blocks, sz.dstate, sz.seqlen}, acc_options);
  } else {
    dB = at::zeros({sz.batch, sz.groups, sz.dstate, sz.seqlen}, acc_options);
    dC = at::zeros({sz.batch, sz.groups, sz.dstate, sz.seqlen}, acc_options);
  }

  BwdParams params{};
  params.sizes = sz;
  params.softplus = softplus;
  params.deterministic = deterministic;
  params.blocks_per_group = n_blocks;
  params.u = u.data_ptr();
  params.delta = delta.data_ptr();
  params.A = A.data_ptr();
  params.B = B.data_ptr();
  params.C = C.data_ptr();
  params.D = data_or_null(D);
  params.delta_bias = data_or_null(delta_bias);
  params.dy = dy.data_ptr();
  params.states = states.data_ptr();
  params.du = du.data_ptr();
  params.ddelta = ddelta.data_ptr();
  params.dA_part = dA_part.data_ptr();
  params.dB = dB.data_ptr();
  params.dC = dC.data_ptr();
  params.dD_part = dD_part.data_ptr();
  params.dbias_part = dbias_part.data_ptr();
  launch_scan_bwd(params, u.scalar_type(), c10::cuda::getCurrentCUDAStream());

  // Fixed-order reductions (deterministic): over the batch, and over the channel blocks of a group.
  constexpr int kBatchDim = 0;
  constexpr int kBlockDim = 2;
  if (deterministic) {
    dB = dB.sum(kBlockDim);
    dC = dC.sum(kBlockDim);
  }
  const at::Tensor dD = D.has_value() ? dD_part.sum(kBatchDim) : at::Tensor();
  const at::Tensor dbias = delta_bias.has_value() ? dbias_part.sum(kBatchDim) : at::Tensor();
  return {du, ddelta, dA_part.sum(kBatchDim), dB, dC, dD, dbias};
}

}  // namespace
}  // namespace defmamba_scan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "defmamba selective scan, CUDA forward and backward (grouped B/C, float32 state)";
  m.def("fwd", &defmamba_scan::fwd, "selective scan forward", py::arg("u"), py::arg("delta"), py::arg("A"),
        py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("softplus"), py::arg("save_states"));
  m.def("bwd", &defmamba_scan::bwd, "selective scan backward", py::arg("u"), py::arg("delta"), py::arg("A"),
        py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("dy"), py::arg("states"),
        py::arg("softplus"), py::arg("deterministic"));
}
