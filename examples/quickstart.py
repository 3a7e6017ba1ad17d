"""Quickstart: a space-varying blur, applied whole and chunk-wise, saved as OME-Zarr; then measured
by the CNN and by bead calibration.

    python examples/quickstart.py [--size 1024] [--out quickstart.zarr]
"""
import argparse

import dask.array as da
import numpy as np
import xarray as xr

import lsfov
from lsfov import psf, simulate

p = argparse.ArgumentParser()
p.add_argument("--size", type=int, default=1024)
p.add_argument("--out", default="quickstart.zarr")
args = p.parse_args()

# 1. A sharp image and a field of PSFs: 4x4 nodes of the Z3 model (defocus + astigmatism).
sharp = simulate.sample_image("hubble", (args.size, args.size))
model = psf.MODELS["Z3"]
params = model.sample(16, rng=0)  # (16, 3): focus, astigmatism, axis
kernels = model.render(params).reshape(4, 4, model.size, model.size)

# 2. The product-convolution operator: bilinear interpolation of the PSFs between nodes.
H = lsfov.ProductConvolution.from_grid(kernels, sharp.shape)
print(H, "| local PSF at the centre sums to", round(float(H.psf_at(args.size / 2, args.size / 2).sum()), 4))

# 3. Apply it to the whole image, and chunk-wise with Dask (halo exchange): same result.
blurred = H.apply(sharp)
chunked = H.apply(da.from_array(sharp, chunks=args.size // 4)).compute()
print("chunked vs whole: max |difference| =", float(np.abs(chunked - blurred).max()))

# 4. Its adjoint is exact: <Hu, v> == <u, H^T v>.
v = np.random.default_rng(1).random(sharp.shape, dtype=np.float32)
print("adjoint check:", float(np.vdot(blurred, v)), "~", float(np.vdot(sharp, H.adjoint(v))))

# 5. Save with µm coordinates: napari and xarray read it back at the right scale.
px = model.optics.pixel_um
ds = xr.Dataset({name: lsfov.io.with_pixel_size(a, px) for name, a in (("sharp", sharp), ("blurred", blurred))})
lsfov.save(ds, args.out, overwrite=True)
print(lsfov.open_result(args.out))

# 6. Read the blur back from the image itself: the shipped Z3 CNN on the 128² patch at each node
#    (no training, no download). validity ~ 0 means "nothing to measure here".
cnn = lsfov.load_model("Z3")
noisy = simulate.degrade(sharp, H, photons=1000, seed=0)
step = args.size // 4
corner = [int(np.clip(step * i + step // 2 - 64, 0, args.size - 128)) for i in range(4)]  # patch near each node
patches = np.stack([noisy[y : y + 128, x : x + 128] for y in corner for x in corner])
est = cnn.predict(patches)
print("true focus  ", np.round(params[:, 0], 2))
print("CNN focus   ", np.round(est["focus"], 2))
print("CNN validity", np.round(est["validity"], 2))

# 7. The whole blind job in one call: a PSF map of the image, its operator, TV-RL, depth.
blind = lsfov.blind_deconvolve(noisy, "Z3", pixel_um=px)
print("blind:", dict(blind.sizes), "| stages (s):", {k: round(v, 2) for k, v in blind.attrs["seconds"].items()})

# 8. Or measure the blur with beads: one bead image gives a product-convolution operator of the
#    microscope (paper 003), compared with the truth on a Dirac comb.
from lsfov.calibrate import operator_distance  # noqa: E402

beads = simulate.bead_field((max(args.size, 384),) * 2, seed=0)
calibrated = lsfov.calibrate_operator(beads.image, n_basis=5)
print(calibrated, "from", calibrated.attrs["n_beads"], "beads; error on a Dirac comb:",
      f"{operator_distance(calibrated, beads.operator):.1%}")
