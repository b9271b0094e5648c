"""Build of the compiled extension ``cmkernels._C`` (torch cpp_extension + ninja).

Sources and compiler flags come from ``csrc/sources.txt`` and ``csrc/flags.txt``, which
CMakeLists.txt reads too, so the two builds cannot drift apart.

Environment switches:
  CMKERNELS_NO_CUDA=1      build the CPU kernels only, even where nvcc and a CUDA torch exist
  CMKERNELS_DEBUG=1        -O0 -g, host and device
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0": A100, H100/H200)
  MAX_JOBS                 parallel compile jobs (default: cores, capped by memory at ~3 GB a job)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no", "off")


def read_lists(path: Path) -> dict[str, list[str]]:
    """Parse ``[section]`` headed lists, one entry a line, '#' comments."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif current is None:
            raise SystemExit(f"{path}: entry {line!r} before any [section]")
        else:
            current.append(line)
    return sections


def default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    return str(max(1, min(cores, int(mem_gb // 3))))


def find_cuda_home() -> str | None:
    # /usr/local/bin/nvcc may be a wrapper script, from which torch would guess CUDA_HOME=/usr/local
    # and then fail to link -lcudart: prefer the real toolkit folder.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def extensions():
    os.environ.setdefault("MAX_JOBS", default_max_jobs())
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension  # reads CUDA_HOME once

    sources = read_lists(ROOT / "csrc" / "sources.txt")
    flags = read_lists(ROOT / "csrc" / "flags.txt")
    use_cuda = (
        not _flag("CMKERNELS_NO_CUDA") and torch.version.cuda is not None and cuda_home is not None
    )
    debug = _flag("CMKERNELS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]

    cxx = flags["cxx"] + opt
    nvcc = flags["nvcc"] + (["-O0", "-G", "-g"] if debug else ["-O3"])
    files = sources["cpp"] + (sources["cuda"] if use_cuda else [])
    macros = [("CMKERNELS_WITH_CUDA", "1" if use_cuda else "0")]

    print(
        f"cmkernels: building {'CUDA' if use_cuda else 'CPU-only'} extension "
        f"(CUDA_HOME={cuda_home}, archs={os.environ['TORCH_CUDA_ARCH_LIST']}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}, debug={debug})",
        file=sys.stderr,
    )
    kind = CUDAExtension if use_cuda else CppExtension
    kwargs = dict(
        name="cmkernels._C",
        sources=files,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        extra_link_args=flags.get("link", []),
    )
    return [kind(**kwargs)]


def main():
    ext_modules = extensions()  # sets CUDA_HOME before torch.utils.cpp_extension reads it
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
