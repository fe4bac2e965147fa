// Makes dcfast._C importable as a Python module; importing it runs the op registrations.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dcfast C++/CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
