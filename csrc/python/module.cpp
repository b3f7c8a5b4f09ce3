// The Python extension module qdec._C. It exports nothing: importing it loads
// the shared object, whose static TORCH_LIBRARY blocks register the ops with
// the dispatcher (no pybind11, so the library stays Python-version agnostic).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr,               nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
