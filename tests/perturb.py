"""Rerun the learning checks under numeric perturbations and print each check's spread (min / mean / max).

A learning check (a metric against a bar: tests/conftest.py's `learning` fixture, tests marked `learning`) must hold
on any CPU, not only on the one where its bar was set. Another CPU rounds differently: other vector kernels (PyTorch's
ATen dispatch, MKL's GEMM path, oneDNN's convolutions), another reduction order (thread count). Each perturbation
below changes one of those on this machine; a bar is set from the minimum over all of them (docs/tests.md).

    python tests/perturb.py                          # every perturbation, every learning check (~1.5 h on 2 cores)
    python tests/perturb.py --only=avx2,threads1     # some perturbations
    python tests/perturb.py --only=avx2 -- -k clip   # arguments after -- go to pytest
    python tests/perturb.py --table                  # the table from the values recorded so far
    python tests/perturb.py --reuse -- -k clip       # keep each perturbation's quick start from the last run

Each perturbation's quick start (the run most checks start from) is kept in out/perturb/cache/<perturbation>, so
that a check downstream of it can be rerun with --reuse without training it again.

Values go to out/perturb/<perturbation>.jsonl (one line per check; a rerun of a perturbation replaces its file) and
the table to out/perturb/table.md.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "perturb"

# name -> (environment, extra pytest arguments). CI runs "default": two xdist workers on 2 cores, one torch thread
# each, the quick start on two.
PERTURBATIONS = {
    "default": ({}, []),
    # AVX2 everywhere: ATen's vectorised kernels, MKL's GEMM and oneDNN's convolutions (an AVX-512 machine's roundings
    # become an AVX2 machine's)
    "avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, []),
    # no ATen vectorisation, MKL's conditional-reproducibility path for an older ISA
    "scalar": ({"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}, []),
    # one thread everywhere, the quick start included (another reduction order)
    "threads1": ({"OMP_NUM_THREADS": "1"}, []),
    # two threads everywhere, in one worker (two workers x two threads would oversubscribe 2 cores)
    "threads2": ({"OMP_NUM_THREADS": "2"}, ["-n", "1"]),
    # AVX2 and one thread together
    "avx2_threads1": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                       "OMP_NUM_THREADS": "1"}, []),
}


def run(name, pytest_args, reuse):
    env, extra = PERTURBATIONS[name]
    log, cache = OUT / f"{name}.jsonl", OUT / "cache" / name
    if not reuse:
        log.unlink(missing_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "learning", "-p", "no:cacheprovider", *extra, *pytest_args]
    print(f"--- {name}: {' '.join(f'{k}={v}' for k, v in env.items()) or '(as CI runs)'} {' '.join(cmd[1:])}",
          flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "NANORAD_LEARNING_LOG": str(log),
                                                  "NANORAD_TEST_CACHE": str(cache)})
    print(f"--- {name}: pytest exit {p.returncode} in {time.time() - t0:.0f} s", flush=True)
    return p.returncode


def table():
    """Markdown: one row per check, its bar, min / mean / max over the perturbations recorded, the margin of the
    worst value over the bar, and each perturbation's value."""
    values = {}  # (test, name) -> {perturbation: value}
    bars = {}
    names = [n for n in PERTURBATIONS if (OUT / f"{n}.jsonl").exists()]
    for n in names:
        for line in open(OUT / f"{n}.jsonl"):
            r = json.loads(line)
            key = (r["test"].split("::")[-1].split("@")[0], r["name"])  # xdist adds @<group> to the test id
            values.setdefault(key, {})[n] = r["value"]  # a rerun's later line replaces the earlier one
            bars[key] = (r["bar"], r["above"])
    rows = ["| check | bar | min | mean | max | worst margin | n | " + " | ".join(names) + " |",
            "|---|---|---|---|---|---|---|" + "---|" * len(names)]
    for key, v in values.items():
        bar, above = bars[key]
        xs = list(v.values())
        worst = min(xs) - bar if above else bar - max(xs)
        rows.append(f"| `{key[0]}`: {key[1]} | {'>=' if above else '<='} {bar:g} | {min(xs):.4f} | "
                    f"{sum(xs) / len(xs):.4f} | {max(xs):.4f} | {worst:+.4f} | {len(xs)} | "
                    + " | ".join(f"{v[n]:.4f}" if n in v else "" for n in names) + " |")
    return "\n".join(rows)


def main(argv):
    import argparse
    own, pytest_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description="Rerun the learning checks under numeric perturbations.")
    parser.add_argument("--only", default=",".join(PERTURBATIONS), help="comma-separated perturbations to run")
    parser.add_argument("--table", action="store_true", help="only print the table of what was recorded")
    parser.add_argument("--reuse", action="store_true", help="keep each perturbation's quick start and its values")
    args = parser.parse_args(own)
    names = args.only.split(",")
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        parser.error(f"unknown perturbation {unknown}; choose from {', '.join(PERTURBATIONS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    failed = [] if args.table else [n for n in names if run(n, pytest_args, args.reuse) != 0]
    md = table()
    (OUT / "table.md").write_text(md + "\n")
    print(md)
    if failed:
        print(f"pytest failed under: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
