"""The build: the ISPC installer, and the extension built from prebuilt ISPC objects (no ispc),
which is how the GPU machines build it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OBJECTS = ROOT / "build/ispc"


def test_install_ispc_is_quick_once_installed():
    # `make setup` has run the installer; a second run only checks and prints the path.
    start = time.monotonic()
    done = subprocess.run(["bash", "scripts/install_ispc.sh"], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60)
    assert time.monotonic() - start < 5
    ispc = done.stdout.strip().splitlines()[-1]
    version = subprocess.run([ispc, "--version"], capture_output=True, text=True, check=True)
    assert "ISPC" in version.stdout


def _copy_sources(dest: Path) -> None:
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "neod").mkdir()
    shutil.copy(ROOT / "neod/__init__.py", dest / "neod/__init__.py")
    shutil.copytree(ROOT / "neod/cython", dest / "neod/cython",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def _env_without_ispc(**extra: str) -> dict[str, str]:
    path = [p for p in os.environ["PATH"].split(os.pathsep)
            if not (Path(p) / "ispc").exists() and ".toolchain" not in p]
    env = {**os.environ, "PATH": os.pathsep.join(path), **extra}
    env.pop("ISPC", None)
    return env


@pytest.mark.skipif(not (OBJECTS / "decode_attention.o").exists(),
                    reason="no prebuilt ISPC objects (run make setup)")
def test_extension_builds_from_prebuilt_objects_without_ispc(tmp_path: Path):
    _copy_sources(tmp_path)
    env = _env_without_ispc(NEOD_ISPC_OBJECTS=str(OBJECTS))
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=300)
    assert not (tmp_path / "build/ispc").exists()  # nothing was compiled by ispc here
    check = (
        "from neod.cython import load_native\n"
        "native = load_native()\n"
        "pool = native.NativePool([0])\n"
        "assert pool.probe_read_bandwidth(1 << 22, [1], 1)[0] > 0\n"
        "pool.close()\n"
        "print(native.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, check=True,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().startswith(str(tmp_path))


def test_missing_prebuilt_objects_are_named(tmp_path: Path):
    _copy_sources(tmp_path)
    env = _env_without_ispc(NEOD_ISPC_OBJECTS=str(tmp_path / "nowhere"))
    done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "lacks" in done.stderr and "decode_attention.o" in done.stderr


def test_unbuilt_extension_explains_how_to_build(tmp_path: Path):
    _copy_sources(tmp_path)
    check = "from neod.cython import load_native\nload_native()\n"
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0
    assert "make setup" in done.stderr and "NEOD_ISPC_OBJECTS" in done.stderr
