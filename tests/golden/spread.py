"""Measure how far the golden runs move under other float32 kernels, and under planted bugs.

    python tests/golden/spread.py                 # every golden file, every kernel variant
    python tests/golden/spread.py --planted       # also the planted bugs (must exceed the tolerances)
    python tests/golden/spread.py --only tiny-gcache.json --variants default avx2

Each run happens in a fresh process, so the kernel settings (MKL_ENABLE_INSTRUCTIONS,
ONEDNN_MAX_CPU_ISA: read once when the libraries load) and the thread count apply to it alone.
Writes tests/golden/spread.json: the CPU, and per file and variant the discrete mismatches and
the largest difference of each floating-point kind (see compare.py). tests/test_golden.py's
tolerances come from these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent / "benchmarks"))
from _common import cpu_info  # noqa: E402

sys.path.insert(0, str(HERE))
import compare  # noqa: E402  (tests/golden is not a package)

OUT = HERE / "spread.json"  # not a golden file: compare.golden_files() leaves it out
# name -> (environment, threads). The default is what tests/test_golden.py runs (one thread).
VARIANTS = {
    "default": ({}, 1),
    "threads2": ({}, 2),
    "avx2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
    "avx2-threads2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 2),
    "sse42": ({"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}, 1),
}
def one(name: str, threads: int, planted: str | None) -> dict:
    """Runs one golden file here (in this process) and returns what differs."""
    changes = dict(compare.PLANTED[planted] or {}) if planted else {}
    if planted and compare.PLANTED[planted] is None:
        import gcache.core.fusion as fusion

        compare.drop_fusion_weight_term(fusion)
    golden = compare.load(name)
    with tempfile.TemporaryDirectory() as tmp:
        records, params = compare.run(golden, Path(tmp) / "run", threads=threads, **changes)
    found = compare.mismatches(golden, records, params)
    diffs = compare.differences(golden, records, params) if not found else {}
    return {"mismatches": found[:5], "num_mismatches": len(found), "differences": diffs}


def spawn(name: str, variant: str, planted: str | None = None) -> dict:
    env, threads = VARIANTS[variant]
    cmd = [sys.executable, __file__, "--one", name, "--threads", str(threads)] + (["--plant", planted] if planted else [])
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plant")
    parser.add_argument("--only", nargs="*", help="golden file names (default: all)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--planted", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.threads, args.plant)))
        return
    names = args.only or compare.golden_files()
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    cpu = cpu_info()
    where = f"{cpu['model']} (family {cpu['family']}; {', '.join(cpu['isa'])})"
    result.setdefault("cpus", {})[where] = cpu
    for name in names:
        entry = result.setdefault("runs", {}).setdefault(name, {})
        for variant in args.variants:
            entry[f"{variant} @ {where}"] = got = spawn(name, variant)
            print(name, variant, json.dumps(got), file=sys.stderr, flush=True)
        for planted in compare.PLANTED if args.planted else ():
            result.setdefault("planted", {}).setdefault(name, {})[planted] = got = spawn(name, "default", planted)
            print(name, planted, json.dumps(got), file=sys.stderr, flush=True)
        OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
