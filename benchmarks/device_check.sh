#!/usr/bin/env bash
# Prove and measure the CUDA path in one run (issue 14): on a GPU machine with PyTorch but without
# network access, install what is missing from .whl/ (benchmarks/fetch_device_wheels.sh fills it
# where there is network), run the tests marked `cuda`, the inference benchmark (ViT-L/14@336-sized
# random model at 518 px; float32, float16, bfloat16, float8 (issue 23); batch 1, 8, 32; the
# official-style forward; CUDA graphs; a profile; predict from PNG files), the end-to-end CLI
# predict against the forward (bench_pipeline: 1024 px PNG and JPEG folders, bfloat16, batch 32)
# and the precision comparison, print the markdown tables for docs/benchmarks.md, and write the
# run's headline figures as one JSON record (benchmarks/device_results.py; issue 23). About 5
# minutes expected on an H100 (the steps' time limits add up to under 9 minutes; --compile adds
# up to 4 more).
#
# Usage:
#   bash benchmarks/device_check.sh              # GPU run
#   bash benchmarks/device_check.sh --dry-run    # CPU, tiny model, small sizes: checks the script itself
#   bash benchmarks/device_check.sh --compile    # GPU run plus torch.compile'd blocks (bfloat16, batch 1 and 8)
# Environment:
#   OUT     directory for the logs (default: a new temporary directory); at most 8 files are written:
#           summary.md env.txt pytest.log bench.log bench.md bench.json profile.txt precision.log
#   PYTHON  interpreter (default python3)
#   RESULTS_DIR  where benchmarks/device_results.py writes the run's record <date>-<gpu>.json
#           (default benchmarks/results on a GPU run, a new temporary directory in the dry run);
#           the record is also printed at the end of the summary (a remote run returns only $OUT)
# Exit status: 0 when every step succeeded, else 1 (every step runs either way).
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
compile=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --compile) compile=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option: $arg (use --dry-run, --compile)" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
LOG="${OUT:-}"
if [ -z "$LOG" ]; then LOG="$(mktemp -d -t anomalyclip-device-check.XXXXXX)"; fi
mkdir -p "$LOG"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
started=$SECONDS
failed=()
summary="$LOG/summary.md"
: > "$summary"

step() {  # step NAME LIMIT_SECONDS LOGFILE CMD...: run with a time limit, log, record failure
    local name="$1" limit="$2" logfile="$3"
    shift 3
    echo
    echo "=== $name (limit ${limit} s; t = $((SECONDS - started)) s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$logfile"
    local rc=${PIPESTATUS[0]}
    local msg="$name: exit $rc in $((SECONDS - t0)) s"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then msg="$name: TIMED OUT after ${limit} s"; fi
    if [ "$rc" -ne 0 ]; then failed+=("$name"); fi
    echo "- $msg" >> "$summary.steps"
    return 0
}
: > "$summary.steps"

# ------------------------------------------------------------------ environment and installation
if [ "$dry_run" -eq 0 ] && ! "$PY" -c "import open_clip" 2>/dev/null; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/anomalyclip-site"
        if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/anomalyclip-site .whl/*.whl; then
            echo "pip failed; unpacking the wheels instead (they are zip archives)"
            for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/anomalyclip-site || failed+=("install"); done
        fi
        export PYTHONPATH="/tmp/anomalyclip-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "open_clip is missing and there is no .whl/ folder: run benchmarks/fetch_device_wheels.sh where there is network" >&2
        failed+=("install")
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); host $(hostname); mode $([ "$dry_run" -eq 1 ] && echo dry-run || echo gpu)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo n/a) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,pstate,temperature.gpu --format=csv 2>&1
        nvidia-smi -q -d CLOCK 2>/dev/null | grep -A4 -i "^    Clocks$" | head -5
    fi
    nproc 2>/dev/null | sed 's/^/CPUs: /'
    "$PY" - <<'EOF'
import platform, importlib
import torch
print(f"python {platform.python_version()}; torch {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}")
print(f"cuda available: {torch.cuda.is_available()}" + (f"; {torch.cuda.get_device_name(0)}; capability {torch.cuda.get_device_capability(0)}" if torch.cuda.is_available() else ""))
for name in ("open_clip", "timm", "huggingface_hub", "safetensors", "numpy", "PIL", "onnxruntime"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}", end="")
        if name == "onnxruntime":
            print(f" providers {module.get_available_providers()}", end="")
        print()
    except Exception as exc:
        print(f"{name}: not importable ({exc})")
import anomalyclip
print(f"anomalyclip {anomalyclip.__version__} from {anomalyclip.__file__}")
EOF
} 2>&1 | tee "$LOG/env.txt"

# ------------------------------------------------------------------ the steps
if [ "$dry_run" -eq 1 ]; then
    # Everything on the CPU with the tiny test CLIP at 112 px, one thread (tiny ops on a busy
    # machine wait on each other's threads otherwise): seconds, and the CUDA tests skip.
    step "pytest -m cuda (expect skips)" 120 "$LOG/pytest.log" \
        "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider tests/test_cuda.py
    step "bench_inference (cpu, tiny)" 180 "$LOG/bench.log" \
        "$PY" benchmarks/bench_inference.py --device cpu --model tiny --image-size 112 --dtype float32,bfloat16 --threads 1 \
        --batch-sizes 1,2 --mode both --repeats 1 --warmup 0 --cuda-graph 1 --profile 2 --profile-out "$LOG/profile.txt" \
        --gemm-size 256 --gemm-seconds 0.02 --predict 4 --predict-image-size 96 \
        --json "$LOG/bench.json" --markdown "$LOG/bench.md"
    step "bench_pipeline (cpu, tiny)" 180 "$LOG/bench.log" \
        "$PY" benchmarks/bench_pipeline.py --device cpu --model tiny --image-size 112 --images 4 --image-px 96 \
        --batch-size 2 --repeats 1 --threads 1 --formats png,jpeg --add-to-json "$LOG/bench.json"
    step "precision_deviation (cpu, 112 px)" 120 "$LOG/precision.log" \
        "$PY" benchmarks/precision_deviation.py --device cpu --image-size 112 --dtypes bfloat16 --threads 1
else
    step "pytest -m cuda" 120 "$LOG/pytest.log" \
        "$PY" -m pytest -m cuda -q -rfEs -s -p no:cacheprovider tests/test_cuda.py
    step "bench_inference (cuda)" 230 "$LOG/bench.log" \
        "$PY" benchmarks/bench_inference.py --device cuda --dtype float32,float16,bfloat16,float8 --batch-sizes 1,8,32 \
        --mode both --repeats 5 --warmup 2 --cuda-graph 1,8 --profile 1,32 --profile-out "$LOG/profile.txt" \
        --predict 128 --json "$LOG/bench.json" --markdown "$LOG/bench.md"
    step "bench_pipeline (cuda)" 120 "$LOG/bench.log" \
        "$PY" benchmarks/bench_pipeline.py --device cuda --dtype bfloat16 --batch-size 32 --images 128 --image-px 1024 \
        --repeats 2 --formats png,jpeg --add-to-json "$LOG/bench.json"
    step "precision_deviation (cuda)" 50 "$LOG/precision.log" \
        "$PY" benchmarks/precision_deviation.py --device cuda --dtypes float16,bfloat16,float8 --large --large-batch 2
    if [ "$compile" -eq 1 ]; then
        step "bench_inference (cuda, torch.compile)" 240 "$LOG/bench.log" \
            "$PY" benchmarks/bench_inference.py --device cuda --dtype bfloat16 --batch-sizes 1,8 --compile \
            --repeats 5 --warmup 2 --gemm-seconds 0.1
    fi
fi

# ------------------------------------------------------------------ the machine-readable record
RESULTS_DIR="${RESULTS_DIR:-}"
if [ -z "$RESULTS_DIR" ]; then
    if [ "$dry_run" -eq 1 ]; then RESULTS_DIR="$(mktemp -d -t anomalyclip-results.XXXXXX)"; else RESULTS_DIR="benchmarks/results"; fi
fi
results_out="$(timeout 60 "$PY" benchmarks/device_results.py --bench-json "$LOG/bench.json" --results-dir "$RESULTS_DIR" \
    $([ "$dry_run" -eq 1 ] && echo --dry-run) 2>&1)" || failed+=("results record")
echo "$results_out"

# ------------------------------------------------------------------ summary (the tail of the output)
# The most important lines last: a remote run returns only the tail of the output (summary.md has it all).
{
    echo "# anomalyclip device check ($([ "$dry_run" -eq 1 ] && echo 'CPU dry run' || echo GPU)), $((SECONDS - started)) s"
    echo
    grep -E "^(NVIDIA|name,)" "$LOG/env.txt" | head -2 | sed 's/^/    /'
    grep -E "cuda available|^python|^anomalyclip" "$LOG/env.txt" | sed 's/^/    /'
    echo
    echo "## inference"
    echo
    if [ -s "$LOG/bench.md" ]; then cat "$LOG/bench.md"; else echo "(no table: see bench.log)"; tail -n 15 "$LOG/bench.log" | sed 's/^/    /'; fi
    echo
    grep -E "^(profile |  (by kind|GPU|CPU| +[0-9.]+ ms))" "$LOG/bench.log" | head -n 26 | cut -c1-150 | sed 's/^/    /'
    grep -E "CUDA graph|ours vs official-style|predict, num_workers" "$LOG/bench.log" | grep -v "^|" | head -n 14 | cut -c1-150 | sed 's/^/    /'
    echo
    echo "## end-to-end predict (bench_pipeline: CLI run vs the forward alone)"
    echo
    grep -E "of the forward" "$LOG/bench.log" | cut -c1-150 | sed 's/^/    /'
    echo
    echo "## precision (max |difference|)"
    echo
    grep -E "vs float32|vs official golden|golden tiny|ViT-L" "$LOG/precision.log" | sed 's/^/    /'
    echo
    echo "## tests"
    echo
    grep -E "^(FAILED|ERROR)|passed|failed|skipped|error" "$LOG/pytest.log" | grep -v "^SKIPPED" | tail -n 25 | cut -c1-200 | sed 's/^/    /'
    grep -E "vs float32 on CUDA" "$LOG/pytest.log" | sed 's/^/    /'
    echo
    echo "## steps"
    echo
    cat "$summary.steps"
    echo
    echo "## results record (commit it as benchmarks/results/<date>-<gpu>.json)"
    echo
    echo "$results_out" | sed 's/^/    /'
} > "$summary"
rm -f "$summary.steps"
echo
echo "================================================================ summary ($LOG)"
cat "$summary"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all steps succeeded"
