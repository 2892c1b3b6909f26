"""Ten-group ``lee`` against the images per pass (``batch_size`` 1, 2, 4, 8), in forwards.

Run: ``OMP_NUM_THREADS=2 python benchmarks/chunks.py MODEL [MODEL ...]`` (batch 8 of the
embedded photos, random init). Each ratio is the fastest of two timed calls after one untimed.
"""

import sys
import time

import torch

import layerlie as ll


def best(fn, repeat: int = 2) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


for name in sys.argv[1:]:
    torch.manual_seed(0)
    model = ll.load_model(name)
    x = ll.photos(model, n=8)
    with torch.no_grad():
        forward = best(lambda: model(x), 3)
    row = [f"{name}: forward {forward * 1e3:.0f} ms"]
    for images in (1, 2, 4, 8):
        row.append(f"{images} images {best(lambda: ll.lee(model, x, 'all', batch_size=images)) / forward:.1f}")
    print("  ".join(row), flush=True)
