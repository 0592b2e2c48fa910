#!/usr/bin/env bash
# Checks what `make setup` needs from the system before it creates .venv: Python >= 3.11 with venv
# support and C headers, and a C compiler. As root on Debian/Ubuntu it installs what is missing;
# otherwise it prints the one apt-get command to run.
set -euo pipefail
python=${1:-python3}

die() { echo "check_build_deps: $*" >&2; exit 1; }

command -v "$python" >/dev/null || die "$python not found: install Python 3.11 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$python is $("$python" -V 2>&1); neod needs Python 3.11 or newer (make PYTHON=python3.X)"

missing=()
"$python" -c 'import ensurepip, venv' 2>/dev/null || missing+=("python3-venv")
"$python" -c 'import os, sysconfig; p = sysconfig.get_paths()["include"]; raise SystemExit(not os.path.exists(os.path.join(p, "Python.h")))' \
    || missing+=("python3-dev")
command -v cc >/dev/null || command -v gcc >/dev/null || missing+=("gcc")
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "check_build_deps: apt-get install -y ${missing[*]}" >&2
    apt-get install -y -q "${missing[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
    exit 0
fi
die "missing ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' (or your system's equivalent)"
