"""The import step of scripts/gpu_check.sh: everything the check runs must import, from this
checkout and the carried wheels, before any GPU time is spent on it.

    python scripts/gpu_check_imports.py REPO [CARRY_SITE]    # gpu_check.sh runs this

1. fasthpa.kernels resolves to REPO/kernels through gpu_check.sh's import shim with any installed
   (editable) fasthpa hidden, and fasthpa itself comes from REPO;
2. every third-party module imported anywhere in fasthpa/, kernels/, benchmarks/ and tests/
   resolves, at module level or inside a function (a lazy import fails only when its code runs,
   minutes into a check), except the optional ones (DALI), which are reported;
3. every module of fasthpa and the four benchmark scripts the check runs import;
4. each package unpacked into CARRY_SITE imports from there, and a tiny stratified split runs
   (iterative-stratification, which the GPU machine lacks unless it is carried).

One line per finding; exit status 1 (with the missing modules and the files importing them) when
anything is missing.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

# modules the code guards (a missing one changes what runs, not whether it runs)
OPTIONAL = {
    "nvidia.dali": "DALI: the loaders fall back to the PyTorch twin, its tests skip",
    "tomli": "only on Python < 3.11, where tomllib is not in the standard library",
}
SCANNED = ("fasthpa", "kernels", "benchmarks", "tests")
BENCHMARKS = ("throughput", "losses", "thresholds", "loader")  # the scripts gpu_check.sh runs


def hide_installed_fasthpa() -> None:
    """Drop an installed (editable) fasthpa so the shim alone has to map fasthpa.kernels."""

    def installed(finder) -> bool:
        module = getattr(finder, "__module__", "") or type(finder).__module__
        return "editable" in module.lower()

    sys.meta_path[:] = [f for f in sys.meta_path if not installed(f)]
    for name in [m for m in sys.modules if m == "fasthpa" or m.startswith("fasthpa.")]:
        del sys.modules[name]


def check_checkout(repo: Path) -> None:
    try:
        spec = importlib.util.find_spec("fasthpa.kernels")
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        raise SystemExit("fasthpa.kernels does not resolve: run this through scripts/gpu_check.sh")
    origin = Path(os.path.realpath(spec.origin))
    print("fasthpa.kernels ->", origin)
    if origin != repo / "kernels" / "__init__.py":
        raise SystemExit(f"fasthpa.kernels resolves to {origin}, not {repo / 'kernels'}")
    import fasthpa

    here = Path(os.path.realpath(fasthpa.__file__))
    print("fasthpa ->", here)
    if repo not in here.parents:
        raise SystemExit(f"fasthpa is imported from {here}, not from {repo}")


def imported_names(repo: Path) -> dict[str, set[str]]:
    """Third-party modules imported anywhere in the scanned folders -> the files importing them
    (``nvidia.X`` kept two deep: ``nvidia`` is a namespace many packages share)."""
    files = [f for d in SCANNED for f in sorted((repo / d).rglob("*.py"))]
    # the scripts import their neighbours by file name (`common`, `helpers`); fasthpa's own
    # modules are always imported as fasthpa.X
    local = {f.stem for d in ("benchmarks", "tests") for f in (repo / d).glob("*.py")}
    local.add("fasthpa")
    found: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "nvidia":
                names = [f"nvidia.{a.name}" for a in node.names]  # `from nvidia import dali`
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                top = ".".join(parts[:2]) if parts[0] == "nvidia" and len(parts) > 1 else parts[0]
                if parts[0] in sys.stdlib_module_names or parts[0] in local:
                    continue
                found.setdefault(top, set()).add(str(f.relative_to(repo)))
    return found


def resolves(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing (or refuses to import)
        return False


def check_third_party(repo: Path) -> list[str]:
    """Every third-party import resolves; returns the problems."""
    found = imported_names(repo)
    missing = [n for n in sorted(found) if not resolves(n)]
    ok = sorted(set(found) - set(missing))
    print(f"third-party imports that resolve ({len(ok)}): {', '.join(ok)}")
    problems = []
    for name in missing:
        if name in OPTIONAL:
            print(f"optional, absent: {name} ({OPTIONAL[name]})")
        else:
            problems.append(f"{name} (imported by {', '.join(sorted(found[name]))})")
    return problems


def check_carried(site: Path | None) -> list[str]:
    """Each package unpacked from the carry folder imports from there."""
    if site is None or not site.is_dir():
        print("carried: nothing (no carry folder was unpacked)")
        return []
    problems = []
    for entry in sorted(site.iterdir()):
        package = entry.is_dir() and (entry / "__init__.py").is_file()
        module = entry.is_file() and entry.suffix in (".py", ".so")
        if not (package or module) or entry.name.startswith("_"):
            continue  # metadata (*.dist-info), private helpers
        name = entry.name.split(".")[0]
        try:
            module = importlib.import_module(name)
        except Exception as e:  # a compiled wheel for another Python fails here, say so
            problems.append(f"carried {name} does not import: {type(e).__name__}: {e}")
            continue
        origin = Path(os.path.realpath(module.__file__ or entry))
        where = "" if Path(os.path.realpath(site)) in origin.parents else " (NOT the carried copy)"
        extra = ""
        if name == "lz4":  # a compiled extension: prove it loads and works
            import lz4.frame

            data = bytes(range(256)) * 64
            if lz4.frame.decompress(lz4.frame.compress(data)) != data:
                problems.append("carried lz4: a compress/decompress round trip differs")
            extra = ", lz4.frame round trip checked"
        print(f"carried: {name} -> {origin}{where}{extra}")
    return problems


def import_everything(repo: Path) -> None:
    """Import every fasthpa module (the kernels too) and the benchmark scripts the check runs."""
    import fasthpa.kernels  # binds fasthpa too

    names = []
    for pkg in (fasthpa, fasthpa.kernels):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] != "__main__":  # running it would start a command
                importlib.import_module(info.name)
                names.append(info.name)
    sys.path.insert(0, str(repo / "benchmarks"))
    for name in BENCHMARKS:
        importlib.import_module(name)
    print(f"imported {len(names)} fasthpa modules and the scripts {', '.join(BENCHMARKS)}")


def check_split() -> None:
    import numpy as np

    from fasthpa.data.splits import stratified_split

    targets = (np.random.default_rng(0).random((40, 28)) < 0.2).astype(np.uint8)
    parts = np.bincount(stratified_split(targets, (0.8, 0.2, 0.0), seed=0), minlength=3)
    print(f"stratified_split (iterstrat): 40 rows -> {parts[0]} train / {parts[1]} dev")
    if parts[0] + parts[1] != 40 or parts[1] == 0:
        raise SystemExit(f"stratified_split gave {parts.tolist()}")


def main(argv: list[str]) -> int:
    repo = Path(os.path.realpath(argv[1]))
    site = Path(argv[2]) if len(argv) > 2 else None
    hide_installed_fasthpa()
    check_checkout(repo)
    problems = check_third_party(repo) + check_carried(site)
    if problems:
        print("MISSING: " + "; ".join(problems))
        print(
            "bring them in the carry folder: scripts/gpu_check.sh --prepare on a machine with "
            "the package registry, then carry .gpu_carry/ (see the README's GPU check)"
        )
        return 1
    import_everything(repo)
    check_split()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
