"""Builds dcfast._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment switches:
  DCFAST_CPU_ONLY=1    build the CPU kernels only, even where CUDA is available
  DCFAST_FORCE_CUDA=1  build the CUDA kernels even when no GPU is visible (needs a CUDA torch and nvcc)
  DCFAST_NO_EXTENSION=1  build nothing; dcfast then runs on its torch reference paths

Install torch first, then this package with `pip install --no-build-isolation .`: build isolation would
download a different torch into the build environment and compile the extension against it.
"""
import glob
import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _extensions():
    if _flag("DCFAST_NO_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:  # pragma: no cover - depends on the build environment
        raise RuntimeError(
            "dcfast's extension is built against the installed torch: install torch first "
            "(pip install torch==2.13.0), then dcfast with `pip install --no-build-isolation .`"
        ) from error

    sources = ["csrc/module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17"]
    if os.environ.get("OMP_ENABLED", "1") != "0":
        cxx_flags.append("-fopenmp")
    with_cuda = not _flag("DCFAST_CPU_ONLY") and cpp_extension.CUDA_HOME is not None and (
        _flag("DCFAST_FORCE_CUDA") or (torch.version.cuda is not None and torch.cuda.is_available())
    )
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = cpp_extension.CUDAExtension(
            "dcfast._C",
            sources,
            extra_compile_args={"cxx": cxx_flags + ["-DDCFAST_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "dcfast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
