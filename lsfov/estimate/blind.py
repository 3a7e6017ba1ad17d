"""The whole blind job of paper 000 in one call: PSF map -> grid operator -> TV-RL -> depth."""
from __future__ import annotations

import numbers
import time
from pathlib import Path

from ..restore.tv_rl import DEFAULT_TV

__all__ = ["blind_deconvolve"]


def blind_deconvolve(image, model="Z3", *, stride: int = 64, iterations: int = 20, tv: float = DEFAULT_TV,
                     calibration=None, pixel_um: float | None = None, symmetrize: bool = False,
                     saturation: float | None = None, max_saturated: float | None = None, background: float = 0.0,
                     scratch=None, resume: bool = False, progress: bool = False):
    """Measure an image's spatially varying blur with the CNN and undo it (what ``lsfov run`` does).

    Parameters
    ----------
    image : ndarray, dask array or xarray.DataArray (H, W)
        The blurred image; Dask input gives a lazy ``deblurred`` (the map is computed in this call).
    model : str, Path or PSFRegressor
        A shipped model name (``"Z3"`` gives depth too) or a trained ``.pt`` file.
    stride : int
        PSF-map node spacing in pixels (:func:`lsfov.estimate_psf_map`).
    iterations : int
        TV-Richardson-Lucy iterations (:func:`lsfov.deconvolve`); checked before any work.
    tv : float
        TV-Richardson-Lucy regularisation weight (:func:`lsfov.deconvolve`); checked before any work.
    calibration : DepthCalibration, dict, str or Path, optional
        From :func:`lsfov.calibrate_depth`, or its JSON file: depth in µm (otherwise the uncalibrated
        signed defocus).
    pixel_um : float, optional
        Pixel size; coordinates of every output in µm (default: the xarray input's, from its
        ``pixel_um`` attribute or µm coordinates; else pixels).
    symmetrize : bool
        Average each node over the 8 rotations and flips of its patch (:func:`lsfov.estimate_psf_map`).
    saturation : float, None or False
        Pixel value at which the camera saturates, as in :func:`lsfov.estimate_psf_map`. The
        deconvolution censors the pixels at ``saturation`` when it is given (``False``: none), else
        at the map's level: the camera's, none with ``max_saturated=1`` (an image stretched to its
        type's range). Its level is the result's attribute ``censored_at``.
    max_saturated : float, optional
        The PSF map's white-pixel ratio (:func:`lsfov.estimate_psf_map`; default 0.05).
    background : float
        The camera's offset, subtracted by the deconvolution (:func:`lsfov.deconvolve`); the CNN
        reads each patch less its mean, which an offset does not change. Checked before any work,
        against the image's largest pixel too (one more read of a Dask image).
    scratch : str or Path, optional
        Dask input only: a directory (on storage every worker sees) for the chunked state of the
        map and the deconvolution (one ``scratch`` serves both), and the operator's kernels, read
        from there window by window.
    resume : bool
        With ``scratch``: continue an interrupted run (Dask input).
    progress : bool
        Show progress bars (the map's for Dask input, the deconvolution's iterations).

    Returns
    -------
    xarray.Dataset
        ``deblurred`` (y, x); the model's parameters, ``validity`` and ``filled`` on the node grid
        (gy, gx); for a model with focus and astigmatism (Z3) also ``focus_astig_sin`` and
        ``focus_astig_cos`` (the regressed focus x astigmatism products, as in the PSF map) and
        ``depth`` (µm with ``calibration``, else the uncalibrated signed defocus in wave RMS).
        Attributes: the map's, ``iterations``, ``tv``, ``background``, ``censored_at`` and ``seconds``
        (wall time of each stage; for Dask input without ``scratch`` the deconvolution's is that of
        building its lazy graph).
        ``lsfov.save`` writes it as one OME-Zarr result; :func:`lsfov.operator_from_psf_map` of it
        gives the operator back.

    Raises
    ------
    ValueError
        If ``iterations``, ``tv`` or ``background`` is out of range, ``model`` is refused (:func:`lsfov.load_model`),
        ``calibration`` is given with a model without focus and axis, or the image cannot be mapped
        or deconvolved (as :func:`lsfov.estimate_psf_map` and :func:`lsfov.deconvolve` say).

    Examples
    --------
    >>> import lsfov
    >>> from lsfov import simulate
    >>> sample = simulate.tilted_surface((256, 256), depth_range_um=(-6, 6), seed=0)
    >>> result = lsfov.blind_deconvolve(sample.image, "Z3", stride=64, iterations=10)
    >>> result["deblurred"].shape, result["focus"].shape, result["depth"].attrs["units"]
    ((256, 256), (3, 3), 'wave RMS')
    >>> sorted(result.data_vars)
    ['astigmatism', 'axis', 'deblurred', 'depth', 'filled', 'focus', 'focus_astig_cos', 'focus_astig_sin', 'validity']
    >>> print(lsfov.save(result, "result.zarr"))
    result.zarr
    >>> lsfov.operator_from_psf_map(lsfov.open_result("result.zarr"))
    ProductConvolution(grid, shape=(256, 256), grid=(3, 3), K=31)
    """
    import dask.base
    import xarray as xr

    from .._validate import boolean, censor_level, squeeze_plane
    from ..io import pixel_size, with_pixel_size
    from ..restore import deconvolve
    from ..restore.tv_rl import check_background, check_clip_above, check_offset_below, check_settings
    from .depth import as_calibration, depth_of, warn_made_otherwise
    from .mapping import estimate_psf_map, made_attrs, operator_from_psf_map
    from .model import PRODUCTS, load_model

    iterations, tv, _, _ = check_settings(iterations, tv)
    background = check_background(background)
    symmetrize, progress = boolean(symmetrize, "symmetrize"), boolean(progress, "progress")
    params = load_model(model).params  # a wrong name or file is refused before any work
    calibration = as_calibration(calibration)
    if calibration is not None and not {"focus", "axis"} <= set(params):
        raise ValueError(f"a depth calibration needs an astigmatic model (Z3); model {model} regresses {list(params)}")
    img = with_pixel_size(squeeze_plane(image), pixel_um)  # a (1, H, W) plane, as NumPy, Dask or xarray
    if isinstance(saturation, numbers.Real) and not isinstance(saturation, bool):  # (others: refused by the map)
        check_clip_above(float(saturation), background)
    check_offset_below(img, background)  # (one read of a lazy image, for its largest pixel)
    if calibration is not None:  # said before the work, not after it
        warn_made_otherwise(made_attrs(model, stride, pixel_size(img), symmetrize), calibration)
    seconds, t = {}, time.perf_counter()
    lazy = type(img.data).__module__.startswith("dask")  # scratch and resume: a chunked run's (the map's too)
    psf_map = estimate_psf_map(img, model, stride=stride, symmetrize=symmetrize, saturation=saturation,
                               max_saturated=max_saturated, scratch=scratch if lazy else None,
                               resume=resume and lazy, progress=progress)
    seconds["PSF map"], t = time.perf_counter() - t, time.perf_counter()
    # With a scratch store its kernels are rendered there, and read by the windows that use them: a
    # slide's map holds gigabytes of kernels (a 32768² one at a node every 64 px 0.93 GiB).
    store = Path(scratch) / f"lsfov-kernels-{dask.base.tokenize(psf_map)}" if lazy and scratch is not None else None
    op = operator_from_psf_map(psf_map, img.shape, store=store)
    seconds["operator"], t = time.perf_counter() - t, time.perf_counter()
    # Censored at the level given; by default at the map's (the camera's), none where its rule is off.
    clip = saturation if saturation is not None else (None if psf_map.attrs["saturation"] is not None else False)
    out = {"deblurred": deconvolve(img, op, iterations, tv, saturation=clip, background=background,
                                   scratch=scratch if lazy else None, resume=resume and lazy, progress=progress)}
    seconds["deconvolution"] = time.perf_counter() - t
    out.update({p: psf_map[p] for p in (*psf_map.attrs["params"], *(q for q in PRODUCTS if q in psf_map), "validity")})
    out["filled"] = psf_map["filled"]
    if {"focus", "axis"} <= set(psf_map):
        out["depth"] = depth_of(psf_map, calibration)
    return xr.Dataset(out, attrs={**psf_map.attrs, "iterations": iterations, "tv": tv, "background": background,
                                  "censored_at": censor_level(img, clip), "seconds": seconds})
