"""Builds dcfast._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Environment switches:
  DCFAST_CPU_ONLY=1    build the CPU kernels only, even where CUDA is available
  DCFAST_FORCE_CUDA=1  build the CUDA kernels even when no GPU is visible (needs a CUDA torch and nvcc)
  DCFAST_NO_EXTENSION=1  build nothing; dcfast then runs on its torch reference paths
  CUDA_HOME            the CUDA toolkit (the folder holding bin/nvcc and include/cuda_runtime.h);
                       found from nvcc, /usr/local/cuda or /usr/local/cuda-* when unset
  TORCH_CUDA_ARCH_LIST which GPUs to compile for, e.g. "9.0" (torch's default: the visible GPUs)

Install torch first, then this package with `pip install --no-build-isolation .`: build isolation would
download a different torch into the build environment and compile the extension against it.
No C++ standard is forced: torch's BuildExtension adds the one the installed torch needs (C++20 for
torch >= 2.13, whose headers refuse anything older).
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _has_headers(home) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _find_cuda_home(torch_cuda):
    """The CUDA toolkit folder, or None when there is no nvcc at all.

    torch guesses CUDA_HOME as the folder above `which nvcc`; where nvcc on PATH is a wrapper script
    (/usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) that guess is /usr/local and the
    build stops at `cuda_runtime.h: No such file`. So every candidate must hold the headers: an
    explicit CUDA_HOME/CUDA_PATH, the folder above the resolved nvcc, /usr/local/cuda, then
    /usr/local/cuda-X.Y (torch's own CUDA version first, else the newest).
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if not _has_headers(explicit):
            raise RuntimeError(
                f"CUDA_HOME={explicit} has no include/cuda_runtime.h: point CUDA_HOME at the CUDA toolkit "
                "(the folder holding bin/nvcc and include/), or set DCFAST_CPU_ONLY=1"
            )
        return explicit
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) for x in p.rsplit("-", 1)[1].split(".")
                                                                     if x.isdigit()], reverse=True)
    candidates += [p for p in versioned if torch_cuda and p.endswith("-" + torch_cuda)] + versioned
    for home in candidates:
        if _has_headers(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    if nvcc or any(os.path.isdir(home) for home in candidates):
        raise RuntimeError(
            f"found nvcc ({nvcc}) but no CUDA toolkit with include/cuda_runtime.h in {candidates}: set CUDA_HOME "
            "to the toolkit folder (e.g. CUDA_HOME=/usr/local/cuda-13.0), or DCFAST_CPU_ONLY=1 for a CPU-only build"
        )
    return None


def _extensions():
    if _flag("DCFAST_NO_EXTENSION"):
        return [], {}
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the build environment
        raise RuntimeError(
            "dcfast's extension is built against the installed torch: install torch first "
            "(pip install torch==2.13.0), then dcfast with `pip install --no-build-isolation .`"
        ) from error

    want_cuda = not _flag("DCFAST_CPU_ONLY") and torch.version.cuda is not None and (
        _flag("DCFAST_FORCE_CUDA") or torch.cuda.is_available()
    )
    if _flag("DCFAST_FORCE_CUDA") and torch.version.cuda is None:
        raise RuntimeError(f"DCFAST_FORCE_CUDA=1 needs a CUDA build of torch, found torch {torch.__version__}")
    cuda_home = _find_cuda_home(torch.version.cuda) if want_cuda else None
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home
    elif _flag("DCFAST_FORCE_CUDA") and not _flag("DCFAST_CPU_ONLY"):
        raise RuntimeError("DCFAST_FORCE_CUDA=1 but no nvcc/CUDA toolkit was found: set CUDA_HOME")

    sources = ["csrc/module.cpp", "csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]  # "loss_kind.h", "checks.h" from every backend folder
    cxx_flags = ["-O3"]
    if os.environ.get("OMP_ENABLED", "1") != "0":
        cxx_flags.append("-fopenmp")
    if cuda_home:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        ext = cpp_extension.CUDAExtension(
            "dcfast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DDCFAST_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "dcfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
