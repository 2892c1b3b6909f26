"""Ten-group ``lee`` against the images per pass (``batch_size`` 1, 2, 4, 8), in forwards.

Run: ``OMP_NUM_THREADS=2 python benchmarks/chunks.py MODEL [MODEL ...]`` (batch 8 of the
embedded photos, random init). Each ratio is the fastest of two timed calls after one untimed.
"""

import sys

import torch

import layerlie as ll
from bench import best_time, setup

for name in sys.argv[1:]:
    model, x = setup(name, batch=8)
    with torch.no_grad():
        forward = best_time(lambda: model(x), repeat=3)
    row = [f"{name}: forward {forward * 1e3:.0f} ms"]
    for images in (1, 2, 4, 8):
        row.append(f"{images} images {best_time(lambda: ll.lee(model, x, 'all', batch_size=images)) / forward:.1f}")
    print("  ".join(row), flush=True)
