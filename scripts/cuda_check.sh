#!/usr/bin/env bash
# The CUDA backend checked on a GPU machine, in one run (within 8 minutes on an H100/H200): install the CUDA
# wheel, run tests/test_cuda.py on device="cuda" (the exact fixtures: float32 within 1e-4, bf16/f16 within 2e-2
# relative, greedy identical where the margin allows, ragged batches, KV cache, GGUF quantized matmuls), then
# scripts/cuda_bench.py (pp512, tg128 in bf16 against transformers on torch CUDA; SmolLM2 Q4_1 decode). Results:
# one JSON, $OUT/cuda_check.json (OUT defaults to ./cuda-check-out).
#
#   scripts/cuda_check.sh --prepare      on a machine with PyPI: the wheels the GPU machine may lack (pytest,
#                                        hypothesis, gguf, candlewick's pure-Python dependencies) for Python 3.12,
#                                        into dist/cuda-check-deps/; the GPU machine needs no network
#   scripts/cuda_check.sh                on the GPU machine, with dist/candlewick_cu13-*.whl (scripts/build_wheels.sh
#                                        --cuda) and dist/cuda-check-deps/ beside it
#   scripts/cuda_check.sh --device cpu   the same checks and bench on the CPU, with the candlewick already
#                                        importable by $PYTHON (a dry run of the script itself)
#
# Environment: PYTHON (default python3: the machine's, with torch and transformers), OUT, TEST_TIMEOUT (default
# 240 s), BENCH_BUDGET (default 200 s: models not started by then are skipped), BENCH_EXTRA (more options for
# scripts/cuda_bench.py, e.g. --no-peer).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=cuda
PREPARE=0
while [ $# -gt 0 ]; do
    case $1 in
        --prepare) PREPARE=1 ;;
        --device) DEVICE=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done
DEPS=$ROOT/dist/cuda-check-deps

if [ $PREPARE = 1 ]; then
    mkdir -p "$DEPS"
    # for the GPU machine's CPython 3.12; numpy and the NVIDIA libraries come with its torch
    "$PYTHON" -m pip download -q -d "$DEPS" --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        pytest hypothesis gguf jinja2 regex safetensors huggingface_hub tqdm fastapi pydantic uvicorn \
        sse-starlette prometheus_client
    rm -f "$DEPS"/numpy-*.whl
    du -sh "$DEPS"
    exit 0
fi

OUT=${OUT:-$PWD/cuda-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
say() { printf '\n== [%3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }

PY=$PYTHON
if [ "$DEVICE" != cpu ]; then
    WHEELS=("$ROOT"/dist/candlewick_cu13-*.whl)
    WHEEL=${WHEELS[-1]}
    [ -f "$WHEEL" ] || { echo "no dist/candlewick_cu13-*.whl: build it with scripts/build_wheels.sh --cuda" >&2; exit 1; }
    say "nvidia-smi"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.csv" >&2
    # a venv on top of the machine's python (torch, transformers, numpy stay as they are); the wheel without its
    # NVIDIA dependencies (torch's copies are used), the rest from the carried wheels where missing
    VENV=${VENV:-/tmp/candlewick-cuda-venv}
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
    PY=$VENV/bin/python
    say "install $(basename "$WHEEL")"
    "$PY" -m pip install -q --no-index --no-deps "$WHEEL" || exit 1
    # shellcheck disable=SC2046  # the requirement list is meant to split
    "$PY" -m pip install -q --no-index --find-links "$DEPS" pytest hypothesis gguf \
        $("$PY" -c 'import importlib.metadata as m; print(" ".join(r.split(";")[0].replace(" ", "") for r in m.requires("candlewick-cu13") if "extra ==" not in r and not r.startswith("nvidia")))') \
        || echo "warning: some dependencies could not be installed offline" >&2
    # cuBLAS, cuRAND, NVRTC: dlopened by name; the NVIDIA wheels torch brought (site-packages/nvidia/*/lib)
    LIBS=$("$PY" -c '
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
print(":".join(dirs))')
    export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    say "CUDA libraries on LD_LIBRARY_PATH"
    for lib in libcublas.so libcublasLt.so libcurand.so libnvrtc.so libcudart.so; do
        found=$(IFS=:; for d in $LIBS; do ls "$d"/$lib.* 2>/dev/null; done | tr '\n' ' ')
        echo "  $lib: ${found:-NOT FOUND (cudarc will fail to open it)}" >&2
    done
fi

say "import"
(cd "$OUT" && "$PY" -c 'import candlewick, sys; print("candlewick from", candlewick.__file__)') >&2 || exit 1

say "tests/test_cuda.py on $DEVICE"
cd "$ROOT" || exit 1
CANDLEWICK_TEST_DEVICE=$DEVICE timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUT/test_cuda.xml" tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" >&2
TEST_RC=${PIPESTATUS[0]}

say "speed"
if [ "$DEVICE" = cpu ]; then
    BENCH_ARGS=(--device cpu --models gpt2-124m --pp 32 --tg 8 --tg-prompt 16 --reps 1)
else
    BENCH_ARGS=(--device "$DEVICE")
fi
# shellcheck disable=SC2086  # BENCH_EXTRA: more options, split on spaces (e.g. --no-peer)
timeout 330 "$PY" "$ROOT/scripts/cuda_bench.py" "${BENCH_ARGS[@]}" ${BENCH_EXTRA:-} --budget "${BENCH_BUDGET:-200}" \
    --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" >&2
BENCH_RC=${PIPESTATUS[0]}

say "results"
"$PY" - "$OUT" "$TEST_RC" "$BENCH_RC" "$DEVICE" <<'EOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET

out, test_rc, bench_rc, device = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
res = {"device": device, "tests": {"exit_code": test_rc}, "bench_exit_code": bench_rc}
smi = out / "nvidia-smi.csv"
if smi.exists():
    res["nvidia_smi"] = smi.read_text().strip()
try:
    suite = ET.parse(out / "test_cuda.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    res["tests"] |= {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    res["tests"]["failed"] = [
        {"test": c.get("name"), "message": (child.get("message") or "")[:500]}
        for c in suite.iter("testcase") for child in c if child.tag in ("failure", "error")]
    res["tests"]["skipped_reasons"] = sorted({(c.find("skipped").get("message") or "")[:300]
                                              for c in suite.iter("testcase") if c.find("skipped") is not None})
except (OSError, ET.ParseError) as e:
    res["tests"]["report"] = f"no junit report: {e}"
try:
    res["bench"] = json.loads((out / "bench.json").read_text())
except (OSError, ValueError) as e:
    res["bench"] = f"no bench results: {e}"
(out / "cuda_check.json").write_text(json.dumps(res, indent=2))
t = res["tests"]
print(f"tests: {t.get('tests')} run, {t.get('failures')} failed, {t.get('errors')} errors, {t.get('skipped')} skipped"
      f" (exit {test_rc}); bench exit {bench_rc}; {out / 'cuda_check.json'}")
EOF
say "done"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
