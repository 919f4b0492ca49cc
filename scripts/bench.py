#!/usr/bin/env python3
"""Benchmark xpcnn against PyTorch: the same as `xpcnn bench`, for running from a checkout.

python scripts/bench.py --output bench.json --full-run ../shared/data/mnist
"""

from xpcnn.apps.cli import bench

if __name__ == "__main__":
    bench(prog_name="scripts/bench.py")
