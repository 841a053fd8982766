"""Build script for the optional C++ CPU extension `vhack._C` (sources in csrc/).

Everything else is declared in pyproject.toml, except the package list (discovered here, see
`packages`). The extension compiles against the torch that is
installed at build time, so install with `pip install --no-build-isolation .` (build isolation would
download a separate, multi-GB torch into the build environment). A failed compile is a warning, never
a failed install: vhack then serves CPU tensors with its vectorised torch path. Set VHACK_NO_EXT=1
to skip the extension.
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def extension_build():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("VHACK_NO_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "vhack: torch not importable at build time; skipping the C++ extension "
            "(use pip install --no-build-isolation)",
            file=sys.stderr,
        )
        return {}

    class OptionalBuildExt(BuildExtension):
        """build_ext that warns instead of failing when the compiler does."""

        def run(self):
            try:
                super().run()
            except Exception as err:
                print(
                    f"WARNING: vhack C++ extension failed to build ({err}); the torch CPU "
                    "path will be used",
                    file=sys.stderr,
                )

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:
                # A library left by an earlier build in build/ must not be shipped instead.
                stale = self.get_ext_fullpath(ext.name)
                if os.path.exists(stale):
                    os.remove(stale)
                print(
                    f"WARNING: vhack C++ extension {ext.name} failed to build ({err}); the "
                    "torch CPU path will be used",
                    file=sys.stderr,
                )

    # Threads come from torch's own intra-op pool (at::parallel_for), so no OpenMP runtime is
    # linked; -fopenmp-simd only lets the compiler vectorise the `omp simd` reductions. The hot
    # loops pick their instruction set at load time (target_clones in csrc/), so the binary stays
    # portable: no -march=native.
    if sys.platform == "win32":
        flags = ["/O2", "/std:c++17"]
    else:
        flags = ["-O3", "-std=c++17", "-fopenmp-simd"]
    ext = CppExtension("vhack._C", sources, extra_compile_args={"cxx": flags})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


def packages() -> list[str]:
    """Every package under vhack/ (discovered, so new subpackages need no list), and kernels/
    installed as vhack.kernels (see pyproject's package-dir)."""
    return [*find_packages(include=["vhack", "vhack.*"]), "vhack.kernels"]


setup(packages=packages(), **extension_build())
