"""Run the tests that compare floating-point results (the files that use tests/numerics.py's
assert_close) under several BLAS settings and check that every comparison keeps half its
tolerance in reserve: margin = error / tolerance <= 0.5.

    python tests/check_tolerances.py                      # stock, OPENBLAS_NUM_THREADS=1, MLX_SLEEP_BLAS=0
    python tests/check_tolerances.py --settings threads1,noblas
    python tests/check_tolerances.py --log stock=LOG.jsonl --settings threads1,noblas
                                                          # a stock run's log (CI: the suite's)
    python tests/check_tolerances.py -- -k rank_slices    # extra pytest arguments

Each setting sums in another order: OpenBLAS with its threads, OpenBLAS on one thread, and
the reference BLAS (mlx_sleep/_blas.py). A test that passes with margin 0.9 on one machine can
fail on the next: 0.5 leaves room for the orders this machine does not try. Prints the worst
margin per test and setting; exits non-zero when a margin is over the limit, when pytest
fails, or when no comparison was logged.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 0.5
SETTINGS = {
    "stock": {},
    "threads1": {"OPENBLAS_NUM_THREADS": "1"},
    "noblas": {"MLX_SLEEP_BLAS": "0"},
}
LABELS = {"stock": "stock", "threads1": "OPENBLAS_NUM_THREADS=1", "noblas": "MLX_SLEEP_BLAS=0"}


def tolerance_files():
    """The test files that compare through assert_close."""
    tests = os.path.join(ROOT, "tests")
    out = []
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(tests, name)) as f:
                if "assert_close(" in f.read():
                    out.append(os.path.join("tests", name))
    return out


def read_log(path, files):
    """{test: (worst margin, what, error, tolerance)} of the log's lines from `files` (a full
    suite's log also holds test_kernel_mutants.py's calls, which fail on purpose)."""
    worst = {}
    if not os.path.exists(path):
        return worst
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["test"].split("::")[0] not in files:
                continue
            margin = float("inf") if r["margin"] == "inf" else r["margin"]
            if r["test"] not in worst or margin > worst[r["test"]][0]:
                worst[r["test"]] = (margin, r["what"], r["error"], r["tolerance"])
    return worst


def run(setting, files, targets, extra, keep=None):
    if keep:
        os.makedirs(keep, exist_ok=True)
        log = os.path.join(keep, f"{setting}.jsonl")
        open(log, "w").close()
    else:
        fd, log = tempfile.mkstemp(prefix=f"tolerances-{setting}-", suffix=".jsonl")
        os.close(fd)
    env = {**os.environ, **SETTINGS[setting], "MLX_SLEEP_TOLERANCE_LOG": log}
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.time() - start
    if done.returncode != 0:
        print(
            f"--- pytest under {LABELS[setting]} failed:\n{done.stdout[-4000:]}"
            f"{done.stderr[-2000:]}"
        )
    else:
        print(f"{LABELS[setting]}: {done.stdout.strip().splitlines()[-1]}")
    worst = read_log(log, files)
    if not keep:
        os.unlink(log)
    return done.returncode, worst, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help="comma-separated, from: " + ", ".join(SETTINGS),
    )
    p.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="SETTING=PATH",
        help="take SETTING's margins from a log written by an earlier run "
        "(MLX_SLEEP_TOLERANCE_LOG=PATH) instead of running it",
    )
    p.add_argument("--limit", type=float, default=LIMIT)
    p.add_argument("--keep", metavar="DIR", help="keep each setting's log as DIR/SETTING.jsonl")
    p.add_argument("--all", action="store_true", help="list every test, not only the worst 25")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = p.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    given = dict(item.split("=", 1) for item in args.log)
    unknown = [s for s in settings + list(given) if s not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {unknown}: use {', '.join(SETTINGS)}")
    files = tolerance_files()
    print(f"{len(files)} files: {' '.join(os.path.basename(f) for f in files)}")
    results, failed = {}, False
    for setting in given:
        results[setting] = read_log(given[setting], files)
        if not results[setting]:
            print(f"{LABELS[setting]}: nothing logged in {given[setting]}")
            failed = True
    for setting in sorted(settings, key=lambda s: s != "stock"):
        if setting in given:
            continue
        # after a stock run, only the tests that compared something there (the other tests of
        # these files do not depend on the BLAS's summation order)
        targets = sorted(results["stock"]) if results.get("stock") else files
        rc, worst, seconds = run(setting, files, targets, args.pytest_args, args.keep)
        print(f"{LABELS[setting]}: {len(worst)} tests compared, {seconds:.0f} s")
        failed |= rc != 0 or not worst
        results[setting] = worst
    order = [s for s in SETTINGS if s in results]
    tests = sorted(
        {t for w in results.values() for t in w},
        key=lambda t: -max(results[s].get(t, (0,))[0] for s in order),
    )
    shown = tests if args.all else tests[:25]
    print(f"\nworst margin (error / tolerance) per test; limit {args.limit}")
    print(" | ".join(f"{LABELS[s]:>22}" for s in order) + " | test: comparison (* over the limit)")
    for t in shown:
        cells, what = [], ""
        for s in order:
            if t in results[s]:
                m, w, *_ = results[s][t]
                cells.append(f"{m:>20.3f}" + (" *" if m > args.limit else "  "))
                if m == max(results[x].get(t, (-1,))[0] for x in order):
                    what = w
            else:
                cells.append(f"{'-':>22}")
        print(" | ".join(cells) + f" | {t}: {what}")
    if len(shown) < len(tests):
        print(f"... {len(tests) - len(shown)} more, all lower (--all lists them)")
    print()
    for s in order:
        m = max((v[0] for v in results[s].values()), default=float("nan"))
        print(f"{LABELS[s]}: worst margin {m:.3f} over {len(results[s])} tests")
    over = [(s, t, v) for s in order for t, v in results[s].items() if v[0] > args.limit]
    for s, t, (m, w, err, tol) in over:
        print(
            f"OVER {args.limit}: {LABELS[s]}: {t}: {w}: error {err:.3g}, tolerance {tol:.3g}, "
            f"margin {m:.3f}"
        )
    if failed:
        print("FAILED: a pytest run failed or logged nothing (see above)")
    return 1 if over or failed else 0


if __name__ == "__main__":
    sys.exit(main())
