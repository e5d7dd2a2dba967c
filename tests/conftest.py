import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx_sleep  # noqa: E402,F401  (before any test imports mlx.core: loads the fast BLAS on Linux)
