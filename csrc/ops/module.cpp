// SPDX-License-Identifier: Apache-2.0
// Python module stub: importing kv_offload._C loads this library, whose static
// initializers register the kv_offload:: torch ops (TORCH_LIBRARY_FRAGMENT in each op file).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "kv_offload native ops (registered as torch.ops.kv_offload.*)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
