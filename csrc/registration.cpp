// Every edm_fast op's schema, in one place. Each op's CUDA implementation registers itself with
// TORCH_LIBRARY_IMPL(edm_fast, CUDA, m) in its own folder (csrc/<op>/<op>.cpp); fake (meta) kernels and
// autograd are registered from Python (edm_fast/ops/<op>.py). Importing edm_fast._C runs these
// registrations; the module itself exposes no Python functions.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(edm_fast, m) {
  // ---- group_norm (csrc/group_norm/) ----
  // act(shift + group_norm(x + pre_add) * (scale + 1)), act = silu or identity; mean/rstd are fp32 [N, G].
  m.def("group_norm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor? pre_add, Tensor? scale, Tensor? shift, "
        "int num_groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // -> (dx, dweight, dbias, dpre_add, dscale, dshift); absent gradients are empty tensors.
  m.def("group_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor? pre_add, Tensor? scale, "
        "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu, bool need_pre_add_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- end group_norm ----

  // ---- attention (csrc/attention/) ----
  // qkv [N, 3C, H, W] (q/k/v interleaved per channel within each head) -> out [N, C, H, W] (head-major) and
  // lse [N * num_heads, H * W] (fp32 logsumexp of the scaled logits, for the backward).
  m.def("attention_fwd(Tensor qkv, int num_heads) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads) -> Tensor grad_qkv");
  // ---- end attention ----

  // ---- heun (csrc/heun/) ----
  // EDM sampler sub-steps on the fp64 state, bit-identical to the Python expressions (see csrc/heun/heun_kernels.cu).
  m.def("heun_euler(Tensor x_hat, Tensor denoised, float t_hat, float t_next) -> Tensor");
  m.def("heun_correct(Tensor x_hat, Tensor x_next, Tensor denoised, Tensor denoised_next, float t_hat, "
        "float t_next) -> Tensor");
  // ---- end heun ----
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "edm_fast CUDA kernels (ops registered under torch.ops.edm_fast)", -1, nullptr};
  return PyModule_Create(&module);
}
