"""The `cjs` command line: parses, calls app/, renders. The only package that imports click."""

import os

# One BLAS thread per process: numpy and scipy each bring an OpenBLAS whose threads fight
# over the cores (measured 5-20x slower BT fits and pair planning on 2 cores). Must run
# before numpy is first imported; the CLI imports this package first.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
