"""Build of neod's native extension `neod.cython._native`: Cython binding, C pool, ISPC kernel.

The ISPC kernel objects come from one of two places:
- NEOD_ISPC_OBJECTS=<dir>: prebuilt objects plus their generated header (`python setup.py
  build_ispc` writes them to build/ispc), for hosts without ispc such as the GPU machines;
- otherwise ispc itself ($ISPC, then PATH, then .toolchain/bin/ispc from scripts/install_ispc.sh)
  compiles ispc/*.ispc into build/ispc for several SIMD targets with runtime dispatch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Command, Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ISPC_DIR = "ispc"
ISPC_BUILD_DIR = "build/ispc"
# One object per target plus the dispatcher; AVX-512 hosts get the x16 code, others fall back.
ISPC_TARGETS = ("sse4-i32x4", "avx2-i32x8", "avx512skx-x16")
ISPC_KERNELS = ("decode_attention",)


def ispc_objects_dir() -> str:
    return os.environ.get("NEOD_ISPC_OBJECTS") or ISPC_BUILD_DIR


def ispc_outputs(out_dir: str) -> list[str]:
    """Objects and the generated C header of every kernel, as ispc names them."""
    files = []
    for kernel in ISPC_KERNELS:
        files.append(f"{out_dir}/{kernel}.o")
        files += [f"{out_dir}/{kernel}_{t.split('-')[0]}.o" for t in ISPC_TARGETS]
        files.append(f"{out_dir}/{kernel}_ispc.h")
    return files


def find_ispc() -> str | None:
    for candidate in (os.environ.get("ISPC"), shutil.which("ispc"), ROOT / ".toolchain/bin/ispc"):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class BuildIspc(Command):
    """Compile ispc/*.ispc into build/ispc (skipped when the objects are newer than the sources)."""

    description = "compile the ISPC kernels into build/ispc"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        sources = sorted(str(p) for p in Path(ISPC_DIR).glob("*.isp*"))
        outputs = ispc_outputs(ISPC_BUILD_DIR)
        newest_source = max(os.path.getmtime(s) for s in sources + [__file__])
        if all(os.path.exists(o) and os.path.getmtime(o) >= newest_source for o in outputs):
            return
        ispc = find_ispc()
        if ispc is None:
            raise SystemExit(
                "ispc not found: run scripts/install_ispc.sh, set ISPC=/path/to/ispc, or set "
                "NEOD_ISPC_OBJECTS to a folder of prebuilt objects (see docs/build.md)"
            )
        os.makedirs(ISPC_BUILD_DIR, exist_ok=True)
        for kernel in ISPC_KERNELS:
            cmd = [
                ispc, "-O3", "--pic", "--woff", f"--target={','.join(ISPC_TARGETS)}",
                "-I", ISPC_DIR, f"{ISPC_DIR}/{kernel}.ispc",
                "-o", f"{ISPC_BUILD_DIR}/{kernel}.o", "-h", f"{ISPC_BUILD_DIR}/{kernel}_ispc.h",
            ]  # fmt: skip
            self.announce(" ".join(cmd), level=2)
            subprocess.run(cmd, check=True)


class BuildExt(build_ext):
    """build_ext that first makes sure the ISPC objects exist (compiled here, or prebuilt)."""

    def run(self) -> None:
        prebuilt = os.environ.get("NEOD_ISPC_OBJECTS")
        if prebuilt:
            missing = [f for f in ispc_outputs(prebuilt) if not os.path.exists(f)]
            if missing:
                raise SystemExit(
                    f"NEOD_ISPC_OBJECTS={prebuilt} lacks {', '.join(missing)}; build them with "
                    "`python setup.py build_ispc` on a host with ispc and copy build/ispc"
                )
        else:
            self.run_command("build_ispc")
        super().run()


objects_dir = ispc_objects_dir()
ispc_files = ispc_outputs(objects_dir)
native = Extension(
    "neod.cython._native",
    sources=[
        "neod/cython/_native.pyx",
        "neod/cython/neod_pool.c",
        "neod/cython/neod_decode.c",
        "neod/cython/neod_layers.c",
        "neod/cython/neod_amx.c",
    ],
    include_dirs=["neod/cython", objects_dir],
    extra_objects=[f for f in ispc_files if f.endswith(".o")],
    depends=[
        "neod/cython/neod_pool.h",
        "neod/cython/neod_decode.h",
        "neod/cython/neod_layers.h",
        "neod/cython/neod_amx.h",
        "neod/cython/_native.pxd",
    ],
    extra_compile_args=["-O2", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
)

ext_modules = cythonize([native], build_dir="build/cython", language_level=3, quiet=True)
# Added after cythonize, which would copy dependencies into its build dir: a changed kernel object
# must relink the extension.
ext_modules[0].depends += ispc_files

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ispc": BuildIspc, "build_ext": BuildExt},
)
