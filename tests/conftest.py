import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx_sleep  # noqa: E402,F401  (before any test imports mlx.core: loads the fast BLAS on Linux)


def pytest_terminal_summary(terminalreporter):
    from tests.parity import TABLES
    from tests.test_kernel_mutants import RESULTS as MUTANTS

    if MUTANTS:
        by_tests = sum("| tests: passed" not in v for v in MUTANTS.values())
        by_check = sum(not v.startswith("self-check: passed") for v in MUTANTS.values())
        terminalreporter.write_sep(
            "-",
            f"kernel mutants: {by_tests}/{len(MUTANTS)} killed by "
            f"the kernel tests, {by_check}/{len(MUTANTS)} by the "
            f"first-use self-check",
        )
        for name, killer in MUTANTS.items():
            terminalreporter.write_line(f"{name}: {killer}")

    for name, measured in TABLES.items():
        if measured:
            terminalreporter.write_sep("-", f"{name}: measured max |difference|")
            for key, value in sorted(measured.items()):
                terminalreporter.write_line(f"{key}: {value:.2e}")
