#!/usr/bin/env bash
# Verify and measure everything GPU-specific in fasthpa on a single-GPU machine, in under 8 min.
#
#   scripts/gpu_check.sh --prepare [CARRY_DIR]    # HERE, with the package registry: download the
#                                                 # wheels the GPU machine lacks (default .gpu_carry/)
#   scripts/gpu_check.sh OUT_DIR                  # THERE: the real check (needs CUDA); carry the
#                                                 # folder with the working tree
#   scripts/gpu_check.sh OUT_DIR --dry-run        # on any machine: environment, carry, imports,
#                                                 # the budget plan, test collection, flag checks,
#                                                 # a tiny CPU throughput run
#   scripts/gpu_check.sh OUT_DIR --skip loader,throughput   # leave steps out (by name)
#   scripts/gpu_check.sh OUT_DIR --carry DIR      # wheels from DIR (default .gpu_carry/)
#   PYTHON=/opt/py/bin/python GPU_CHECK_BUDGET_S=480 scripts/gpu_check.sh OUT_DIR
#
# It uses the PyTorch (2.11 or newer), Triton and (if present) DALI the machine already has and
# needs no network. Packages that machine lacks (iterative-stratification; lz4) come as wheels in
# the carry folder: the carry step unpacks them into a temporary site folder on PYTHONPATH before
# anything imports them. fasthpa is imported from this checkout without being installed: a
# sitecustomize.py in a temporary folder on PYTHONPATH maps `fasthpa.kernels` to the top-level
# kernels/ folder (what `pip install` does through package-dir), so it also holds in subprocesses
# (torchrun) and whatever the working directory; it chains to any sitecustomize it shadows.
#
# Steps, each with its own time limit (the plan below; they sum within GPU_CHECK_BUDGET_S, 480 s):
#   env         versions, GPU, DALI present or absent            -> OUT_DIR/env.txt, nvidia-smi.txt
#   carry       unpack the carried wheels                          -> carry.log
#   import      scripts/gpu_check_imports.py: fasthpa.kernels from this checkout; every third-party
#               import in the code resolves (DALI optional); the carried packages import; every
#               fasthpa module and benchmark script imports         -> import.log
#   pytest      pytest -m "gpu or dali": Triton kernels compiled for real vs the reference, the
#               AMP + compile training step and runs (one of them through torchrun, DDP and
#               NCCL), DALI decode (skipped if DALI is absent)  -> pytest_gpu.log, pytest_gpu.xml
#   throughput  benchmarks/throughput.py at 512 px: ladder (one cold compile) + eager batch sweep
#   losses      benchmarks/losses.py --device cuda --quick
#   thresholds  benchmarks/thresholds.py --devices cuda --quick (CPU baselines capped)
#   loader      benchmarks/loader.py --device cuda
# Every benchmark rewrites its result files after each row, so a step stopped at its limit still
# leaves what it measured. Every log and result file lands in OUT_DIR (flat); summary.md and the
# table printed last give each step's status, time and headline figure. Exit status: 0 when every
# step passed.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

# ---- the plan: each step's limit (s) on the GPU run; with SUMMARY_S for the summary they must fit
# the budget. Compile costs drive it: a cold inductor compile of ResNet18 forward + backward takes
# roughly 40-90 s on a 16-core host. pytest compiles it twice at 64 px (one run in process, one
# through torchrun + DDP, whose graph DDPOptimizer splits; the kernels are cached by then), the
# throughput ladder once at 512 px (the fused-loss rung reuses that compiled model). The batch
# sweep runs eager (--sweep-compile off): compiled statically it costs one cold compile per size.
STEPS=(env carry import pytest throughput losses thresholds loader)
declare -A LIMIT=([env]=15 [carry]=10 [import]=25 [pytest]=180 [throughput]=140 [losses]=40
    [thresholds]=20 [loader]=30)
SUMMARY_S=10
# the wheels the GPU machine lacks: pinned, one version of each (two stop an install)
CARRY_WHEELS=("iterative-stratification==0.1.9" "lz4==4.4.5")
CARRY_MAX_MIB=32  # the device tool carries at most 64 MiB with the working tree

usage() {
    echo "usage: scripts/gpu_check.sh --prepare [CARRY_DIR]" >&2
    echo "       scripts/gpu_check.sh OUT_DIR [--dry-run] [--skip STEP[,STEP...]] [--carry DIR]" >&2
    exit 2
}

# ---- --prepare: here, with the registry: wheels for CPython 3.12 on manylinux x86_64
prepare() {
    local dir=$1
    mkdir -p "$dir" || { echo "error: cannot create $dir" >&2; exit 2; }
    rm -f "$dir"/*.whl
    if ! "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir" "${CARRY_WHEELS[@]}"; then
        echo "error: pip download failed: is the package registry reachable from here?" >&2
        exit 1
    fi
    local bytes
    bytes=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
    echo
    ls -l "$dir"
    echo "carry folder $dir: $(ls "$dir"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB"
    if ((bytes > CARRY_MAX_MIB * 1024 * 1024)); then
        echo "error: over $CARRY_MAX_MIB MiB: the device tool carries 64 MiB with the tree" >&2
        exit 1
    fi
    echo "next: carry '$(realpath --relative-to="$repo" "$dir" 2>/dev/null || echo "$dir")' with the" \
        "working tree and run scripts/gpu_check.sh OUT_DIR there"
    exit 0
}

[[ $# -ge 1 ]] || usage
if [[ "$1" == --prepare ]]; then
    (($# <= 2)) || usage
    prepare "${2:-$repo/.gpu_carry}"
fi
[[ "$1" != -* ]] || usage
out_arg=$1; shift
dry_run=0
skip=","
carry="${GPU_CHECK_CARRY:-$repo/.gpu_carry}"
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --skip) [[ $# -ge 2 ]] || usage; skip=",$2,"; shift ;;
        --carry) [[ $# -ge 2 ]] || usage; carry=$2; shift ;;
        *) echo "error: unknown option $1" >&2; usage ;;
    esac
    shift
done

mkdir -p "$out_arg" || { echo "error: cannot create $out_arg" >&2; exit 2; }
out="$(cd "$out_arg" && pwd)"
budget="${GPU_CHECK_BUDGET_S:-480}"
start=$SECONDS

# ---- the import shim: fasthpa from this checkout, fasthpa.kernels -> kernels/
shim="$(mktemp -d "${TMPDIR:-/tmp}/fasthpa_gpu_check.XXXXXX")"
trap 'rm -rf "$shim"' EXIT
site="$shim/site"  # the carried wheels, unpacked by the carry step
cat > "$shim/sitecustomize.py" <<'PY'
# Written by scripts/gpu_check.sh (deleted when it ends): import fasthpa.kernels from the
# checkout's top-level kernels/ folder, as an installed fasthpa would.
import importlib.abc
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.environ["FASTHPA_REPO"], "kernels")


class _FasthpaKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "fasthpa.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS]
        )


sys.meta_path.insert(0, _FasthpaKernelsFinder())

# run the sitecustomize this file shadows, if there is one further down sys.path
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _candidate = os.path.join(os.path.abspath(_entry or os.getcwd()), "sitecustomize.py")
    if os.path.dirname(_candidate) != _here and os.path.isfile(_candidate):
        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _candidate)
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
        break
PY
export FASTHPA_REPO="$repo"
export PYTHONPATH="$shim:$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

# ---- step runner: NAME LIMIT_S LOG CMD...; records status, seconds and the log per step
names=(); statuses=(); seconds=(); logs=(); figures=()
record() { names+=("$1"); statuses+=("$2"); seconds+=("$3"); logs+=("$4"); figures+=("$5"); }
skipped() { [[ "$skip" == *",$1,"* ]]; }

run_step() {
    local name=$1 limit=$2 log=$3; shift 3
    if skipped "$name"; then
        record "$name" "skipped (--skip)" 0 "-" "-"
        return 0
    fi
    local left=$((budget - (SECONDS - start) - 5))
    if ((left < 10)); then
        record "$name" "skipped (time budget spent)" 0 "-" "-"
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit} s): $*" | tee "$out/$log" >&2
    local t0=$SECONDS rc
    ( cd "$repo" && timeout --kill-after=10 "$limit" "$@" ) >>"$out/$log" 2>&1
    rc=$?
    local status=ok
    if ((rc == 124 || rc == 137)); then status="timeout (${limit} s)"; elif ((rc != 0)); then status="FAILED (exit $rc)"; fi
    echo "== $name: $status in $((SECONDS - t0)) s" >&2
    record "$name" "$status" "$((SECONDS - t0))" "$log" "-"
    return $rc
}
set_figure() { [[ "${statuses[${#statuses[@]}-1]}" == skipped* ]] || figures[${#figures[@]}-1]="$1"; }

# dry run: the flags this script passes to a benchmark (the words of its command that start
# with --) must exist in the benchmark's --help
flag_step() {
    local name=$1 log=$2 script=$3; shift 3
    local help missing=() flags=() t0=$SECONDS
    if skipped "$name"; then
        record "$name" "skipped (--skip)" 0 "-" "-"
        return 0
    fi
    for word in "$@"; do [[ "$word" == --* ]] && flags+=("$word"); done
    if ! help="$(cd "$repo" && timeout 60 "$python" "$script" --help 2>&1)"; then
        echo "$help" >"$out/$log"
        record "$name" "FAILED ($script --help)" "$((SECONDS - t0))" "$log" "-"
        return 1
    fi
    for flag in "${flags[@]}"; do grep -q -- "$flag\b" <<<"$help" || missing+=("$flag"); done
    { echo "$help"; echo; echo "flags used by gpu_check.sh: ${flags[*]}"; } >"$out/$log"
    if ((${#missing[@]})); then
        record "$name" "FAILED (flags missing)" "$((SECONDS - t0))" "$log" "missing: ${missing[*]}"
        return 1
    fi
    record "$name" ok "$((SECONDS - t0))" "$log" "dry run: flags ${flags[*]} exist"
}

# ---- the plan, printed first: the GPU run's step limits against the budget
plan_total=$SUMMARY_S
plan_parts=()
for s in "${STEPS[@]}"; do plan_parts+=("$s ${LIMIT[$s]}"); plan_total=$((plan_total + LIMIT[$s])); done
plan_fits=0; ((plan_total <= budget)) && plan_fits=1
plan="plan (GPU run, step limits in s): $(IFS=,; echo "${plan_parts[*]}" | sed 's/,/ + /g') + summary $SUMMARY_S = $plan_total s of the $budget s budget: $( ((plan_fits)) && echo fits || echo 'DOES NOT FIT (later steps get what is left)')"
echo "$plan" | tee "$out/plan.txt" >&2

# the benchmark commands of the GPU run (the dry run checks their flags)
throughput_cmd=(benchmarks/throughput.py --device cuda --image-size 512 --warmup 2 --repeats 3
    --e2e-steps 5 --max-batch 512 --sweep-compile off --out "$out")
losses_cmd=(benchmarks/losses.py --device cuda --quick --out-dir "$out")
thresholds_cmd=(benchmarks/thresholds.py --devices cuda --quick --baseline-max-n 5000
    --budget-s 1 --out-dir "$out")
loader_cmd=(benchmarks/loader.py --device cuda --threads "$(nproc)" --n 192 --sizes 512
    --repeats 2 --out-dir "$out")
# the dry run's own steps run on whatever CPU is at hand: their limits are its own, generous
lim() { ((dry_run)) && echo 120 || echo "${LIMIT[$1]}"; }

# ---- env
run_step env "$(lim env)" env.txt "$python" - "$out" <<'PY'
import os, subprocess, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
ver = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print("torch >= 2.11:", ver >= (2, 11))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton absent:", e)
try:
    from nvidia import dali
    print("DALI", dali.__version__)
except Exception:
    print("DALI absent")
print("cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm {p.major}{p.minor}")
print("cpu cores", os.cpu_count())
try:  # bounded: a wedged driver must not eat the step
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=8)
    open(os.path.join(sys.argv[1], "nvidia-smi.txt"), "w").write(smi.stdout + smi.stderr)
except (OSError, subprocess.SubprocessError) as e:
    print("nvidia-smi:", e)
sys.exit(0 if ver >= (2, 11) else 3)
PY
env_rc=$?
dali="$(grep -m1 '^DALI' "$out/env.txt" 2>/dev/null || echo 'DALI unknown')"
cuda_ok="$(grep -c '^cuda available: True' "$out/env.txt" 2>/dev/null)"
gpu0="$(grep -m1 '^gpu 0' "$out/env.txt" | cut -d: -f2- | sed 's/^ //')"
set_figure "${gpu0:-no CUDA GPU}; $dali"
((env_rc == 3)) && statuses[${#statuses[@]}-1]="FAILED (torch older than 2.11)"

# ---- carry: the wheels the machine lacks, unpacked before anything imports them
run_step carry "$(lim carry)" carry.log "$python" - "$carry" "$site" <<'PY'
import sys, zipfile
from pathlib import Path
carry, site = Path(sys.argv[1]), Path(sys.argv[2])
wheels = sorted(carry.glob("*.whl")) if carry.is_dir() else []
print(f"carry folder {carry}: {len(wheels)} wheels")
here = {"py3", f"py{sys.version_info[0]}{sys.version_info[1]}", f"cp{sys.version_info[0]}{sys.version_info[1]}"}
for wheel in wheels:
    built_for = wheel.name[:-4].split("-")[-3].split(".")  # name-version-PYTHON-abi-platform
    if not here.intersection(built_for):  # a compiled wheel for the GPU machine's Python
        print(f"skipped {wheel.name}: built for {'.'.join(built_for)}, not this Python")
        continue
    with zipfile.ZipFile(wheel) as z:
        # iterative-stratification's wheel ships its own top-level tests/ package: no part of
        # what fasthpa imports, and left out so that it can shadow nothing
        z.extractall(site, [m for m in z.namelist() if not m.startswith("tests/")])
    print(f"unpacked {wheel.name} ({wheel.stat().st_size / 2**20:.2f} MiB) -> {site}")
PY
set_figure "$(grep -c '^unpacked' "$out/carry.log" 2>/dev/null) unpacked, $(grep -c '^skipped' "$out/carry.log" 2>/dev/null) skipped (other Python), from $carry"

# ---- import: everything the steps run imports, from this checkout and the carry
run_step import "$(lim import)" import.log "$python" scripts/gpu_check_imports.py "$repo" "$site"
set_figure "$(grep -m1 -E '^(MISSING|ok$)' "$out/import.log" 2>/dev/null | cut -c1-160)"

if ((dry_run)); then
    # ---- dry run: everything that needs no GPU, so the script itself is tested anywhere
    record plan "$( ((plan_fits)) && echo ok || echo 'FAILED (over budget)')" 0 plan.txt "$plan_total s of $budget s"
    run_step pytest 120 pytest_gpu.log "$python" -m pytest -m "gpu or dali" tests/ --collect-only -q -p no:cacheprovider
    set_figure "$(grep -Eo '[0-9]+(/[0-9]+)? tests? collected' "$out/pytest_gpu.log" | tail -1) (collect only)"
    flag_step throughput throughput_flags.log "${throughput_cmd[@]}"
    flag_step losses losses.log "${losses_cmd[@]}"
    flag_step thresholds thresholds.log "${thresholds_cmd[@]}"
    flag_step loader loader.log "${loader_cmd[@]}"
    run_step throughput-cpu 240 throughput.log "$python" benchmarks/throughput.py --device cpu \
        --image-size 32 --batch-size 2 --batch-sizes 2 --warmup 0 --repeats 1 --e2e-steps 1 \
        --synth-n 8 --compile off --matmul-n 512 --workers 0 --loader torch --out "$out"
elif [[ "$cuda_ok" != 1 ]]; then
    record gpu-steps "FAILED (no CUDA device: see env.txt)" 0 env.txt "-"
else
    run_step pytest "${LIMIT[pytest]}" pytest_gpu.log "$python" -m pytest -m "gpu or dali" tests/ \
        -v -p no:cacheprovider --durations=12 --junitxml="$out/pytest_gpu.xml"
    tally="$(grep -E '^=+ .*(passed|failed|error).* =+$' "$out/pytest_gpu.log" | tail -1 | tr -d '=' | sed 's/^ *//')"
    [[ -n "$tally" ]] || tally="stopped: $(grep -c ' PASSED' "$out/pytest_gpu.log") passed, $(grep -cE ' (FAILED|ERROR)' "$out/pytest_gpu.log") failed so far"
    set_figure "$tally"
    run_step throughput "${LIMIT[throughput]}" throughput.log "$python" "${throughput_cmd[@]}"
    run_step losses "${LIMIT[losses]}" losses.log "$python" "${losses_cmd[@]}"
    run_step thresholds "${LIMIT[thresholds]}" thresholds.log "$python" "${thresholds_cmd[@]}"
    run_step loader "${LIMIT[loader]}" loader.log "$python" "${loader_cmd[@]}"
fi

# ---- headline figures, from the result files (partial ones too)
headline() {
    local json
    json="$(ls -t "$out"/"$1"_*.json 2>/dev/null | head -1)"
    [[ -n "$json" ]] || return 0
    "$python" - "$1" "$json" <<'PY' 2>/dev/null
import json, sys
theme, d = sys.argv[1], json.load(open(sys.argv[2]))
rows, s = d["rows"], ""
if theme == "throughput":
    lad = [r for r in rows if r.get("section") == "ladder"]
    sw = [r for r in rows if r.get("section") == "sweep" and not r.get("oom")]
    if lad:
        best = max(lad, key=lambda r: r["images_per_s"])
        e2e = max((r.get("e2e_images_per_s", 0) for r in lad), default=0)
        s = f"ladder best {best['images_per_s']:.0f} img/s ({best['step']}), e2e {e2e:.0f} img/s"
    if sw:
        top = max(sw, key=lambda r: r["images_per_s"])
        s += f"; sweep best {top['images_per_s']:.0f} img/s at batch {top['batch']}, MFU {100 * top['mfu']:.0f}%"
elif theme == "losses":
    big = [r for r in rows if r.get("kind") != "step" and isinstance(r.get("triton vs eager"), float)]
    if big:
        r = max(big, key=lambda r: r["batch"])
        s = f"triton vs eager {r['triton vs eager']:.2f}x ({r['loss']}, batch {r['batch']})"
elif theme == "thresholds":
    ex = [r for r in rows if r.get("method") == "fasthpa exact" and r.get("device") == "cuda"]
    if ex:
        r = max(ex, key=lambda r: r["n"])
        ratio = r.get("x_vs_sklearn_loop")
        s = f"exact on cuda, N={r['n']:,}: {1e3 * r['median_s']:.2f} ms" + (f", {ratio:.0f}x sklearn loop" if ratio else "")
elif theme == "loader" and rows:
    r = max(rows, key=lambda r: r["samples_per_s"])
    s = f"best {r['samples_per_s']:.0f} samples/s ({r['size']} px {r['layout']} {r['backend']})"
print(("(partial) " if not d.get("complete", True) else "") + s)
PY
}
for i in "${!names[@]}"; do
    case "${names[$i]}" in
        throughput | losses | thresholds | loader)
            ((dry_run)) || figures[$i]="$(headline "${names[$i]}")" ;;
        throughput-cpu) figures[$i]="$(headline throughput)" ;;
    esac
done

# ---- summary, printed last
total=$((SECONDS - start))
{
    echo "# fasthpa gpu_check: $(date -Iseconds)"
    echo
    echo "- out: $out; python: $python; mode: $([[ $dry_run == 1 ]] && echo 'dry run' || echo GPU); total ${total} s of ${budget} s budget"
    echo "- $(grep -m1 '^torch' "$out/env.txt" 2>/dev/null); $(grep -m1 '^triton' "$out/env.txt" 2>/dev/null); $dali"
    echo "- $plan"
    echo
    echo "| step | status | seconds | log | result |"
    echo "|---|---|---|---|---|"
    for i in "${!names[@]}"; do
        echo "| ${names[$i]} | ${statuses[$i]} | ${seconds[$i]} | ${logs[$i]} | ${figures[$i]} |"
    done
} >"$out/summary.md"
echo
printf '%-14s %-30s %7s  %-20s %s\n' step status seconds log result
for i in "${!names[@]}"; do
    printf '%-14s %-30s %7s  %-20s %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${logs[$i]}" "${figures[$i]}"
done
echo "$plan"
echo "total ${total} s (budget ${budget} s); everything is in $out (summary.md)"
failed=0
for s in "${statuses[@]}"; do [[ "$s" == ok || "$s" == "skipped (--skip)" ]] || failed=1; done
exit $failed
