// Every edm_fast op's schema, in one place. Each op's CUDA implementation registers itself with
// TORCH_LIBRARY_IMPL(edm_fast, CUDA, m) in its own folder (csrc/<op>/<op>.cpp); fake (meta) kernels and
// autograd are registered from Python (edm_fast/ops/<op>.py). Importing edm_fast._C runs these
// registrations; the module itself exposes no Python functions.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(edm_fast, m) {
  // ---- group_norm (csrc/group_norm/) ----
  // ---- end group_norm ----

  // ---- attention (csrc/attention/) ----
  // ---- end attention ----

  // ---- heun (csrc/heun/) ----
  // ---- end heun ----
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "edm_fast CUDA kernels (ops registered under torch.ops.edm_fast)", -1, nullptr};
  return PyModule_Create(&module);
}
