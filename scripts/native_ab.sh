#!/usr/bin/env bash
# Two builds of the native module side by side, for an A/B on one machine (docs/build.md).
#
#   scripts/native_ab.sh export REV    here: the native sources of git revision REV into
#                                      build/ab/REV (ignored by git: carry it to the GPU host)
#   scripts/native_ab.sh build REV     there: a copy of this tree in /tmp/ab-REV with those
#                                      sources, built against the carried build/ispc objects
#
# Then run the same command in both trees, e.g.
#   (cd /tmp/ab-REV && PYTHONPATH=$PWD:/tmp/neod-site python3 -m neod.bench.cpu_program)
# from inside the tree: `python -m` puts the working directory first on sys.path. The ISPC
# kernel objects are the carried ones in both builds.
set -euo pipefail
what=${1:?usage: scripts/native_ab.sh export|build REV}
rev=${2:?usage: scripts/native_ab.sh export|build REV}
case $what in
    export)
        mkdir -p "build/ab/$rev"
        for f in $(git ls-tree --name-only "$rev" neod/cython/ | grep -E '\.(c|h|pyx|pxd)$'); do
            git show "$rev:$f" > "build/ab/$rev/$(basename "$f")"
        done
        echo "build/ab/$rev: $(ls "build/ab/$rev" | wc -l) files" ;;
    build)
        [ -d "build/ab/$rev" ] || { echo "no build/ab/$rev: export it first" >&2; exit 2; }
        dest=/tmp/ab-$rev
        rm -rf "$dest" && mkdir -p "$dest/build"
        cp -r neod setup.py pyproject.toml "$dest/"
        cp -r build/ispc "$dest/build/"
        [ ! -f build/libneod_cuda.so ] || cp build/libneod_cuda.so "$dest/build/"
        rm -f "$dest"/neod/cython/*.c "$dest"/neod/cython/*.h "$dest"/neod/cython/_native*.so
        cp "build/ab/$rev"/* "$dest/neod/cython/"
        if ! (cd "$dest" && NEOD_ISPC_OBJECTS=build/ispc python3 setup.py -q build_ext --inplace \
                > build.log 2>&1); then
            tail -20 "$dest/build.log" >&2
            exit 1
        fi
        echo "$dest" ;;
    *) echo "usage: scripts/native_ab.sh export|build REV" >&2; exit 2 ;;
esac
