// Python binding of the CPU selective scan (module defmamba_scan_cpu): input checks, buffers, the parallel loops and
// the fixed-order reductions. The per-task kernels are in scan_kernel.h; the instruction set (avx2 or generic) is
// chosen when the module loads, and set_isa switches it (tests; not while a scan runs).
//
// Determinism: forward tasks are (batch, channel) rows and write disjoint outputs; backward tasks are (batch, group,
// channel block) with the block count a function of the shape only, each writing its own partial buffers, which are
// summed in a fixed order. Results are therefore bitwise independent of the thread count and of scheduling.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the at::Tensor caster; lighter than <torch/extension.h>

#include <string>
#include <tuple>

#include "scan_params.h"

namespace defmamba_scan {
namespace {

// The backward wants at least this many (batch, group, channel block) tasks, so that small batches still spread over
// the cores; the count depends on the shape only (never on the thread count), which keeps results deterministic.
constexpr int64_t kMinBackwardTasks = 64;

bool avx2_supported() {
#ifdef DEFMAMBA_SCAN_HAVE_AVX2
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// The kernel set in use: the best one the CPU supports, unless set_isa chose the generic one (tests cover both).
bool& avx2_selected() {
  static bool selected = avx2_supported();
  return selected;
}

std::string isa() { return avx2_selected() ? "avx2" : "generic"; }

void set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx2" || name == "generic", "defmamba_scan_cpu: isa must be 'avx2' or 'generic', got '",
              name, "'");
  TORCH_CHECK(name == "generic" || avx2_supported(),
              "defmamba_scan_cpu: this CPU (or build) has no AVX2 + FMA kernels");
  avx2_selected() = name == "avx2";
}

template <typename scalar_t>
void run_forward_task(const ForwardArgs<scalar_t>& args, int64_t task) {
#ifdef DEFMAMBA_SCAN_HAVE_AVX2
  if (avx2_selected()) return avx2::forward_task(args, task);
#endif
  generic::forward_task(args, task);
}

template <typename scalar_t>
void run_backward_task(const BackwardArgs<scalar_t>& args, int64_t task) {
#ifdef DEFMAMBA_SCAN_HAVE_AVX2
  if (avx2_selected()) return avx2::backward_task(args, task);
#endif
  generic::backward_task(args, task);
}

std::string shape_str(const at::Tensor& tensor) { return c10::str(tensor.sizes()); }

void check_tensor(const at::Tensor& tensor, const char* name, at::IntArrayRef expected, const char* layout,
                  at::ScalarType dtype) {
  TORCH_CHECK(tensor.device().is_cpu(), "defmamba_scan_cpu: ", name, " must be a CPU tensor, got device ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, "defmamba_scan_cpu: ", name, " must have dtype ", dtype,
              " like u, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == expected, "defmamba_scan_cpu: ", name, " must have shape ", layout, " = ", expected,
              ", got ", shape_str(tensor));
}

// Validated sizes of one call.
struct Sizes {
  int64_t batch, channels, groups, len, nstate;
};

Sizes check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& C, const c10::optional<at::Tensor>& D,
                   const c10::optional<at::Tensor>& delta_bias) {
  TORCH_CHECK(u.device().is_cpu(), "defmamba_scan_cpu: u must be a CPU tensor, got device ", u.device());
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "defmamba_scan_cpu: u must be float32 or float64, got ", u.scalar_type());
  TORCH_CHECK(u.dim() == 3, "defmamba_scan_cpu: u must have shape (batch, G*D, L), got ", shape_str(u));
  TORCH_CHECK(A.dim() == 2, "defmamba_scan_cpu: A must have shape (G*D, N), got ", shape_str(A));
  TORCH_CHECK(B.dim() == 4, "defmamba_scan_cpu: B must have shape (batch, G, N, L), got ", shape_str(B));
  const Sizes sizes{u.size(0), u.size(1), B.size(1), u.size(2), A.size(1)};
  TORCH_CHECK(sizes.batch > 0 && sizes.channels > 0 && sizes.len > 0,
              "defmamba_scan_cpu: u must have batch, G*D, L > 0, got ", shape_str(u));
  TORCH_CHECK(sizes.groups > 0 && sizes.channels % sizes.groups == 0, "defmamba_scan_cpu: the G = ", sizes.groups,
              " groups of B must divide the G*D = ", sizes.channels, " channels of u");
  TORCH_CHECK(sizes.nstate > 0, "defmamba_scan_cpu: A must have N > 0 states, got ", shape_str(A));
  const auto dtype = u.scalar_type();
  check_tensor(delta, "delta", u.sizes(), "(batch, G*D, L) like u", dtype);
  check_tensor(A, "A", {sizes.channels, sizes.nstate}, "(G*D, N)", dtype);
  check_tensor(B, "B", {sizes.batch, sizes.groups, sizes.nstate, sizes.len}, "(batch, G, N, L)", dtype);
  check_tensor(C, "C", {sizes.batch, sizes.groups, sizes.nstate, sizes.len}, "(batch, G, N, L) like B", dtype);
  if (D) check_tensor(*D, "D", {sizes.channels}, "(G*D)", dtype);
  if (delta_bias) check_tensor(*delta_bias, "delta_bias", {sizes.channels}, "(G*D)", dtype);
  return sizes;
}

// (batch, G, N, L) -> contiguous (batch, G, L, N): the N values of a time step side by side for the kernels.
at::Tensor state_major(const at::Tensor& tensor) { return tensor.transpose(2, 3).contiguous(); }

template <typename scalar_t>
const scalar_t* optional_ptr(const c10::optional<at::Tensor>& tensor) {
  return tensor ? tensor->data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
ForwardArgs<scalar_t> make_forward_args(const Sizes& sizes, const at::Tensor& u, const at::Tensor& delta,
                                        const at::Tensor& A, const at::Tensor& Bt, const at::Tensor& Ct,
                                        const c10::optional<at::Tensor>& D,
                                        const c10::optional<at::Tensor>& delta_bias, bool delta_softplus) {
  return ForwardArgs<scalar_t>{u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                               Bt.data_ptr<scalar_t>(), Ct.data_ptr<scalar_t>(), optional_ptr<scalar_t>(D),
                               optional_ptr<scalar_t>(delta_bias), nullptr, nullptr, sizes.batch, sizes.channels,
                               sizes.groups, sizes.len, sizes.nstate, delta_softplus};
}

c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& tensor) {
  if (!tensor) return tensor;
  return tensor->contiguous();
}

// Returns y (batch, G*D, L) and, when save_checkpoints, the states at every kChunk-th step
// (batch, G*D, ceil(L / kChunk), N) that backward needs; otherwise an empty tensor.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const c10::optional<at::Tensor>& D_in,
                                           const c10::optional<at::Tensor>& delta_bias_in, bool delta_softplus,
                                           bool save_checkpoints) {
  const Sizes sizes = check_inputs(u_in, delta_in, A_in, B, C, D_in, delta_bias_in);
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous();
  const at::Tensor Bt = state_major(B), Ct = state_major(C);
  const auto D = contiguous(D_in), delta_bias = contiguous(delta_bias_in);
  at::Tensor y = at::empty_like(u);
  at::Tensor checkpoints =
      save_checkpoints ? at::empty({sizes.batch, sizes.channels, num_chunks(sizes.len), sizes.nstate}, u.options())
                       : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "defmamba_scan_cpu_forward", [&] {
    auto args = make_forward_args<scalar_t>(sizes, u, delta, A, Bt, Ct, D, delta_bias, delta_softplus);
    args.y = y.data_ptr<scalar_t>();
    args.checkpoints = save_checkpoints ? checkpoints.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, sizes.batch * sizes.channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) run_forward_task(args, task);
    });
  });
  return {y, checkpoints};
}

// dB, dC: sum the channel-block partials (batch, G, blocks, L, N) in block order into (batch, G, N, L).
template <typename scalar_t>
void reduce_state_grad(const at::Tensor& partial, at::Tensor& out) {
  const int64_t rows = partial.size(0) * partial.size(1), blocks = partial.size(2);
  const int64_t len = partial.size(3), nstate = partial.size(4);
  const scalar_t* src = partial.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* row_src = src + row * blocks * len * nstate;
      scalar_t* row_dst = dst + row * nstate * len;
      for (int64_t t = 0; t < len; ++t) {
        for (int64_t n = 0; n < nstate; ++n) {
          scalar_t total = row_src[t * nstate + n];
          for (int64_t block = 1; block < blocks; ++block) total += row_src[(block * len + t) * nstate + n];
          row_dst[n * len + t] = total;
        }
      }
    }
  });
}

// dA, dD, d_delta_bias: sum the per-(batch, channel) partials (batch, rest...) over batch in batch order.
template <typename scalar_t>
at::Tensor reduce_over_batch(const at::Tensor& partial) {
  const int64_t batch = partial.size(0), inner = partial.numel() / batch;
  at::Tensor out = partial[0].clone();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const scalar_t* src = partial.data_ptr<scalar_t>();
  for (int64_t b = 1; b < batch; ++b)
    for (int64_t i = 0; i < inner; ++i) dst[i] += src[b * inner + i];
  return out;
}

// Gradients (du, ddelta, dA, dB, dC, dD, d_delta_bias) for the inputs of forward; dD and d_delta_bias are undefined
// (None in Python) when D and delta_bias were not given.
std::vector<at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& u_in, const at::Tensor& delta_in,
                                 const at::Tensor& A_in, const at::Tensor& B, const at::Tensor& C,
                                 const c10::optional<at::Tensor>& D_in,
                                 const c10::optional<at::Tensor>& delta_bias_in, bool delta_softplus,
                                 const at::Tensor& checkpoints_in) {
  const Sizes sizes = check_inputs(u_in, delta_in, A_in, B, C, D_in, delta_bias_in);
  const auto dtype = u_in.scalar_type();
  check_tensor(dy_in, "dy", u_in.sizes(), "(batch, G*D, L) like u", dtype);
  check_tensor(checkpoints_in, "checkpoints",
               {sizes.batch, sizes.channels, num_chunks(sizes.len), sizes.nstate},
               "(batch, G*D, ceil(L / chunk), N) (call forward with save_checkpoints=True)", dtype);
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous();
  const at::Tensor dy = dy_in.contiguous(), checkpoints = checkpoints_in.contiguous();
  const at::Tensor Bt = state_major(B), Ct = state_major(C);
  const auto D = contiguous(D_in), delta_bias = contiguous(delta_bias_in);
  const int64_t per_group = sizes.channels / sizes.groups;
  const int64_t group_rows = sizes.batch * sizes.groups;
  const int64_t blocks = std::min(per_group, (kMinBackwardTasks + group_rows - 1) / group_rows);

  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(u);
  at::Tensor dB_partial = at::zeros({sizes.batch, sizes.groups, blocks, sizes.len, sizes.nstate}, u.options());
  at::Tensor dC_partial = at::zeros_like(dB_partial);
  at::Tensor dA_partial = at::empty({sizes.batch, sizes.channels, sizes.nstate}, u.options());
  at::Tensor dD_partial = at::empty({sizes.batch, sizes.channels}, u.options());
  at::Tensor ddelta_bias_partial = at::empty({sizes.batch, sizes.channels}, u.options());
  at::Tensor dB = at::empty_like(B, at::MemoryFormat::Contiguous), dC = at::empty_like(C, at::MemoryFormat::Contiguous);
  at::Tensor dA, dD, ddelta_bias;
  AT_DISPATCH_FLOATING_TYPES(dtype, "defmamba_scan_cpu_backward", [&] {
    BackwardArgs<scalar_t> args{make_forward_args<scalar_t>(sizes, u, delta, A, Bt, Ct, D, delta_bias, delta_softplus),
                                dy.data_ptr<scalar_t>(),
                                du.data_ptr<scalar_t>(),
                                ddelta.data_ptr<scalar_t>(),
                                dB_partial.data_ptr<scalar_t>(),
                                dC_partial.data_ptr<scalar_t>(),
                                dA_partial.data_ptr<scalar_t>(),
                                dD_partial.data_ptr<scalar_t>(),
                                ddelta_bias_partial.data_ptr<scalar_t>(),
                                blocks};
    args.fwd.checkpoints = checkpoints.data_ptr<scalar_t>();
    at::parallel_for(0, group_rows * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) run_backward_task(args, task);
    });
    reduce_state_grad<scalar_t>(dB_partial, dB);
    reduce_state_grad<scalar_t>(dC_partial, dC);
    dA = reduce_over_batch<scalar_t>(dA_partial);
    if (D) dD = reduce_over_batch<scalar_t>(dD_partial);
    if (delta_bias) ddelta_bias = reduce_over_batch<scalar_t>(ddelta_bias_partial);
  });
  return {du, ddelta, dA, dB, dC, dD, ddelta_bias};
}

}  // namespace
}  // namespace defmamba_scan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Selective scan on the CPU: grouped forward and backward (float32 and float64)";
  // The scans release Python's GIL (their arguments are converted before, their results after): other Python
  // threads (logging, a TensorBoard writer, a pin-memory thread) run meanwhile.
  m.def("forward", &defmamba_scan::forward, "y, checkpoints = forward(u, delta, A, B, C, D, delta_bias, "
        "delta_softplus, save_checkpoints)", py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"),
        py::arg("D"), py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("save_checkpoints"),
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &defmamba_scan::backward, "du, ddelta, dA, dB, dC, dD, ddelta_bias = backward(dy, u, delta, A, "
        "B, C, D, delta_bias, delta_softplus, checkpoints)", py::arg("dy"), py::arg("u"), py::arg("delta"),
        py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("delta_bias"), py::arg("delta_softplus"),
        py::arg("checkpoints"), py::call_guard<py::gil_scoped_release>());
  m.def("isa", &defmamba_scan::isa, "the instruction set the kernels run with: 'avx2' or 'generic'");
  m.def("set_isa", &defmamba_scan::set_isa, "run the 'generic' kernels, or the 'avx2' ones where supported (tests)",
        py::arg("name"));
  m.attr("CHUNK") = defmamba_scan::kChunk;
}
