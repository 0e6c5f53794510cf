#!/usr/bin/env bash
# Verify and measure everything GPU-specific in fasthpa on a single-GPU machine, in under 8 min.
#
#   scripts/gpu_check.sh OUT_DIR              # the real check (needs CUDA)
#   scripts/gpu_check.sh OUT_DIR --dry-run    # on any machine: environment, import shim, test
#                                             # collection, a tiny CPU throughput run, flag checks
#   scripts/gpu_check.sh OUT_DIR --skip loader,throughput   # leave steps out (by name)
#   PYTHON=/opt/py/bin/python GPU_CHECK_BUDGET_S=470 scripts/gpu_check.sh OUT_DIR
#
# It uses the PyTorch (2.11 or newer), Triton and (if present) DALI the machine already has:
# it installs nothing and needs no network. fasthpa is imported from this checkout without being
# installed: a sitecustomize.py in a temporary folder on PYTHONPATH maps `fasthpa.kernels` to the
# top-level kernels/ folder (what `pip install` does through package-dir), so it also holds in
# subprocesses and whatever the working directory; it chains to any sitecustomize it shadows.
#
# Steps, each with its own time limit inside a total budget (GPU_CHECK_BUDGET_S, default 465 s):
#   env         versions, GPU, DALI present or absent            -> OUT_DIR/env.txt, nvidia-smi.txt
#   import      fasthpa.kernels resolves to this checkout         -> OUT_DIR/import.log
#   pytest      pytest -m "gpu or dali": Triton kernels compiled for real vs the reference, the
#               AMP + compile training step, DALI decode (skipped by the tests if DALI is absent)
#                                                                 -> pytest_gpu.log, pytest_gpu.xml
#   throughput  benchmarks/throughput.py at 512 px: ladder + batch sweep (OOM step-back) + MFU
#   losses      benchmarks/losses.py --device cuda --quick
#   thresholds  benchmarks/thresholds.py --devices cuda --quick
#   loader      benchmarks/loader.py --device cuda
# Every log and result file lands in OUT_DIR (flat); summary.md and the table printed last
# give each step's status, time and headline figure. Exit status: 0 when every step passed.
set -uo pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [--skip STEP[,STEP...]]" >&2; exit 2; }
[[ $# -ge 1 && "$1" != -* ]] || usage
out_arg=$1; shift
dry_run=0
skip=","
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --skip) [[ $# -ge 2 ]] || usage; skip=",$2,"; shift ;;
        *) echo "error: unknown option $1" >&2; usage ;;
    esac
    shift
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out_arg" || { echo "error: cannot create $out_arg" >&2; exit 2; }
out="$(cd "$out_arg" && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
budget="${GPU_CHECK_BUDGET_S:-465}"
start=$SECONDS

# ---- the import shim: fasthpa from this checkout, fasthpa.kernels -> kernels/
shim="$(mktemp -d "${TMPDIR:-/tmp}/fasthpa_gpu_check.XXXXXX")"
trap 'rm -rf "$shim"' EXIT
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
export PYTHONPATH="$shim:$repo${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg

# ---- step runner: NAME LIMIT_S LOG CMD...; records status, seconds and the log per step
names=(); statuses=(); seconds=(); logs=(); figures=()
record() { names+=("$1"); statuses+=("$2"); seconds+=("$3"); logs+=("$4"); figures+=("$5"); }

run_step() {
    local name=$1 limit=$2 log=$3; shift 3
    if [[ "$skip" == *",$name,"* ]]; then
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

# dry run: the flags this script passes to another benchmark must exist there
flag_step() {
    local name=$1 log=$2 script=$3; shift 3
    local help missing=() t0=$SECONDS
    if [[ "$skip" == *",$name,"* ]]; then
        record "$name" "skipped (--skip)" 0 "-" "-"
        return 0
    fi
    if ! help="$(cd "$repo" && timeout 60 "$python" "$script" --help 2>&1)"; then
        echo "$help" >"$out/$log"
        record "$name" "FAILED ($script --help)" "$((SECONDS - t0))" "$log" "-"
        return 1
    fi
    for flag in "$@"; do grep -q -- "$flag" <<<"$help" || missing+=("$flag"); done
    { echo "$help"; echo; echo "flags used by gpu_check.sh: $*"; } >"$out/$log"
    if ((${#missing[@]})); then
        record "$name" "FAILED (flags missing)" "$((SECONDS - t0))" "$log" "missing: ${missing[*]}"
        return 1
    fi
    record "$name" ok "$((SECONDS - t0))" "$log" "dry run: flags $* exist"
}

# ---- env
run_step env 60 env.txt "$python" - <<'PY'
import importlib.util, os, sys
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
sys.exit(0 if ver >= (2, 11) else 3)
PY
env_rc=$?
dali="$(grep -m1 '^DALI' "$out/env.txt" 2>/dev/null || echo 'DALI unknown')"
cuda_ok="$(grep -c '^cuda available: True' "$out/env.txt" 2>/dev/null)"
gpu0="$(grep -m1 '^gpu 0' "$out/env.txt" | cut -d: -f2- | sed 's/^ //')"
set_figure "${gpu0:-no CUDA GPU}; $dali"
((env_rc == 3)) && statuses[${#statuses[@]}-1]="FAILED (torch older than 2.11)"
command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi >"$out/nvidia-smi.txt" 2>&1

# ---- import: fasthpa.kernels must come from this checkout, even with any installed copy hidden
run_step import 60 import.log "$python" - <<'PY'
import importlib.util, os, sys
repo = os.path.realpath(os.environ["FASTHPA_REPO"])
# hide an installed (editable) fasthpa so the shim alone has to do the mapping
def installed(finder):
    return "editable" in (getattr(finder, "__module__", "") or type(finder).__module__).lower()
sys.meta_path[:] = [f for f in sys.meta_path if not installed(f)]
for name in [m for m in sys.modules if m == "fasthpa" or m.startswith("fasthpa.")]:
    del sys.modules[name]
spec = importlib.util.find_spec("fasthpa.kernels")
origin = os.path.realpath(spec.origin)
print("fasthpa.kernels ->", origin)
assert origin == os.path.join(repo, "kernels", "__init__.py"), origin
import fasthpa, fasthpa.kernels  # noqa: E401 (torch is imported here)
print("fasthpa ->", os.path.realpath(fasthpa.__file__))
assert os.path.realpath(fasthpa.__file__).startswith(repo + os.sep)
print("ok")
PY
import_rc=$?

if ((dry_run)); then
    # ---- dry run: everything that needs no GPU, so the script itself is tested anywhere
    run_step pytest 120 pytest_gpu.log "$python" -m pytest -m "gpu or dali" tests/ --collect-only -q -p no:cacheprovider
    set_figure "$(grep -Eo '[0-9]+(/[0-9]+)? tests? collected' "$out/pytest_gpu.log" | tail -1) (collect only)"
    run_step throughput 240 throughput.log "$python" benchmarks/throughput.py --device cpu \
        --image-size 32 --batch-size 2 --batch-sizes 2 --warmup 0 --repeats 1 --e2e-steps 1 \
        --synth-n 8 --compile off --matmul-n 512 --workers 0 --loader torch --out "$out"
    flag_step losses losses.log benchmarks/losses.py --device --quick --out-dir
    flag_step thresholds thresholds.log benchmarks/thresholds.py --devices --quick --out-dir
    flag_step loader loader.log benchmarks/loader.py --device --threads --n --sizes --repeats --out-dir
elif [[ "$cuda_ok" != 1 ]]; then
    record gpu-steps "FAILED (no CUDA device: see env.txt)" 0 env.txt "-"
else
    run_step pytest 200 pytest_gpu.log "$python" -m pytest -m "gpu or dali" tests/ -q -p no:cacheprovider \
        --junitxml="$out/pytest_gpu.xml"
    set_figure "$(grep -E '(passed|failed|error)' "$out/pytest_gpu.log" | tail -1 | tr -d '=' | sed 's/^ *//')"
    run_step throughput 150 throughput.log "$python" benchmarks/throughput.py --device cuda \
        --image-size 512 --warmup 2 --repeats 3 --e2e-steps 5 --max-batch 512 --out "$out"
    run_step losses 60 losses.log "$python" benchmarks/losses.py --device cuda --quick --out-dir "$out"
    run_step thresholds 25 thresholds.log "$python" benchmarks/thresholds.py --devices cuda --quick \
        --out-dir "$out"
    # last, with whatever the budget has left (its limit is capped by the budget)
    run_step loader 40 loader.log "$python" benchmarks/loader.py --device cuda --threads "$(nproc)" \
        --n 192 --sizes 512,256 --repeats 2 --out-dir "$out"
fi

# headline of the throughput step, from its result file
tp_json="$(ls -t "$out"/throughput_*.json 2>/dev/null | head -1)"
if [[ -n "$tp_json" ]]; then
    for i in "${!names[@]}"; do
        [[ "${names[$i]}" == throughput ]] || continue
        figures[$i]="$("$python" - "$tp_json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
lad = [r for r in d["rows"] if r.get("section") == "ladder"]
sw = [r for r in d["rows"] if r.get("section") == "sweep" and not r.get("oom")]
best = max(lad, key=lambda r: r["images_per_s"])
e2e = max((r.get("e2e_images_per_s", 0) for r in lad), default=0)
top = max(sw, key=lambda r: r["images_per_s"]) if sw else None
s = f"ladder best {best['images_per_s']:.0f} img/s ({best['step']}), e2e {e2e:.0f} img/s"
if top:
    s += f"; sweep best {top['images_per_s']:.0f} img/s at batch {top['batch']}, MFU {100 * top['mfu']:.0f}%"
print(s)
PY
)"
    done
fi

# ---- summary, printed last
total=$((SECONDS - start))
{
    echo "# fasthpa gpu_check: $(date -Iseconds)"
    echo
    echo "- out: $out; python: $python; mode: $([[ $dry_run == 1 ]] && echo 'dry run' || echo GPU); total ${total} s of ${budget} s budget"
    echo "- $(grep -m1 '^torch' "$out/env.txt" 2>/dev/null); $(grep -m1 '^triton' "$out/env.txt" 2>/dev/null); $dali"
    echo
    echo "| step | status | seconds | log | result |"
    echo "|---|---|---|---|---|"
    for i in "${!names[@]}"; do
        echo "| ${names[$i]} | ${statuses[$i]} | ${seconds[$i]} | ${logs[$i]} | ${figures[$i]} |"
    done
} >"$out/summary.md"
echo
printf '%-11s %-30s %7s  %-16s %s\n' step status seconds log result
for i in "${!names[@]}"; do
    printf '%-11s %-30s %7s  %-16s %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${logs[$i]}" "${figures[$i]}"
done
echo "total ${total} s (budget ${budget} s); everything is in $out (summary.md)"
failed=0
for s in "${statuses[@]}"; do [[ "$s" == ok || "$s" == "skipped (--skip)" ]] || failed=1; done
exit $failed
