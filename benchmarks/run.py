"""Operator benchmarks: product-convolution apply vs one plain FFT convolution, side by side.

    python benchmarks/run.py [--size 2048] [--repeat 5]

Writes benchmarks/RESULTS.md (with the machine it ran on). Goal (foundation issue): a 64-PSF grid
apply costs at most 5x one full-image FFT convolution with a 31x31 kernel.
"""
import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import scipy.fft

from lsfov import ProductConvolution, psf
from lsfov._backend import next_fast_len


def best_of(f, repeat):
    f()  # warm caches (kernel spectra, FFT plans)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--kernel", type=int, default=31)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    a = ap.parse_args()
    n, k = a.size, a.kernel
    rng = np.random.default_rng(0)
    u = rng.random((n, n), dtype=np.float32)
    model = psf.MODELS["Z3"]

    f = next_fast_len(n + k - 1)
    kf = scipy.fft.rfft2(model.render(model.sample(1, 0), size=k)[0], s=(f, f))

    def fft_conv():
        return scipy.fft.irfft2(scipy.fft.rfft2(u, s=(f, f), workers=-1) * kf, s=(f, f), workers=-1)

    rows = []
    t_ref = best_of(fft_conv, a.repeat)
    rows.append(("plain scipy.fft convolution (reference)", t_ref, t_ref))
    for g in (1, 4, 8):
        kern = model.render(model.sample(g * g, g), size=k).reshape(g, g, k, k)
        op = ProductConvolution.from_grid(kern, (n, n))
        rows.append((f"grid {g}x{g} = {g * g} PSFs, apply", best_of(lambda: op.apply(u), a.repeat), t_ref))
        rows.append((f"grid {g}x{g} = {g * g} PSFs, adjoint", best_of(lambda: op.adjoint(u), a.repeat), t_ref))
    basis = ProductConvolution.from_basis(rng.standard_normal((5, k, k)), rng.random((5, n, n), dtype=np.float32))
    rows.append(("basis, 5 kernels, apply", best_of(lambda: basis.apply(u), a.repeat), t_ref))
    rows.append(("basis, 5 kernels, adjoint", best_of(lambda: basis.adjoint(u), a.repeat), t_ref))

    t_psf = best_of(lambda: model.render(model.sample(4096, 1), size=31), max(1, a.repeat // 2))

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"
    lines = [
        "# Benchmarks",
        "",
        f"Run `python benchmarks/run.py` ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC) on {machine}; "
        f"numpy {np.__version__}, scipy {scipy.__version__}. Best of {a.repeat}; every row is measured in the "
        "same run as the reference, so the ratios are what to compare across machines.",
        "",
        f"## Product-convolution operator, {n}x{n} float32, {k}x{k} kernels",
        "",
        "| operation | time (ms) | x one FFT convolution |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {t * 1e3:.1f} | {t / ref:.2f} |" for name, t, ref in rows]
    g64 = next(t for name, t, _ in rows if name.startswith("grid 8x8") and name.endswith("apply"))
    verdict = "met" if g64 / t_ref <= 5 else "NOT met"
    lines += [
        "",
        f"Goal: 64-PSF grid apply <= 5x one FFT convolution: **{verdict}** ({g64 / t_ref:.2f}x).",
        "",
        "## PSF rendering",
        "",
        f"Z3 pupil PSFs, 31x31, batch of 4096: {t_psf * 1e3:.0f} ms ({t_psf / 4096 * 1e6:.0f} µs per PSF).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
