"""A short GPU check: lee and attribution on CUDA, timed with CUDA events, completeness printed.

Run: ``python benchmarks/gpu_check.py`` on a machine with a GPU.
"""

from __future__ import annotations

import warnings

import torch

import layerlie as ll


def cuda_time(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1000


def main() -> None:
    warnings.simplefilter("ignore")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for name in ("resnet18", "vit_tiny_patch16_224", "convnext_atto"):
        torch.manual_seed(0)
        model = ll.load_model(name, device="cuda")
        x = ll.photos(model, n=8)
        with torch.no_grad():
            t_fwd = cuda_time(lambda: model(x))
        t_one = cuda_time(lambda: ll.lee(model, x, "translate_x"))
        t_all = cuda_time(lambda: ll.lee(model, x, "all"))
        t_db = cuda_time(lambda: ll.lee(model, x, "all", method="double_backward"), 1)
        gm = ll.trace(model, x)
        a = ll.attribute(gm, x[:2], "rotate")
        t_exact = cuda_time(lambda: ll.attribute(gm, x, "translate_x"), 1)
        t_shares = cuda_time(lambda: ll.attribute(gm, x, "translate_x", estimator="shares"), 1)
        ab = ll.ablate(gm, x, variants=["blurpool", "all"], groups=["translate_x"], estimator="shares").table
        print(f"{name}: fwd {t_fwd * 1e3:.2f} ms, lee 1 group {t_one / t_fwd:.2f} fwd, 10 groups {t_all / t_fwd:.2f} fwd,"
              f" double backward / ours {t_db / t_all:.2f}, attribution residual {a.residual:.1e}; batch 8:"
              f" exact {t_exact:.2f} s, shares {t_shares:.2f} s; LEE reduction blurpool"
              f" {ab['factor_translate_x'].iloc[1]:.1f}x, all {ab['factor_translate_x'].iloc[2]:.1f}x", flush=True)


if __name__ == "__main__":
    main()
