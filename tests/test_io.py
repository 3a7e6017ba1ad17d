import json
import logging
import os
import shutil
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

import lsfov


def _image(h=300, w=420, px=0.125, y0=2.0):
    data = np.random.default_rng(0).random((h, w)).astype(np.float32)
    coords = {
        "y": xr.Variable("y", y0 + px * np.arange(h), attrs={"units": "micrometer"}),
        "x": xr.Variable("x", px * np.arange(w), attrs={"units": "micrometer"}),
    }
    return xr.DataArray(da.from_array(data, chunks=128), dims=("y", "x"), coords=coords, name="deblurred",
                        attrs={"units": "photon"})


def test_images_on_one_grid_without_coordinates_share_its_pixel_size(tmp_path):
    """A mask beside its image, neither with coordinates, is on the image's pixels: saved with its
    pixel size, it reads back on the same grid (each with its own, the Dataset was padded to 121² with
    NaN); two pixel sizes for one grid are refused."""
    raw = xr.DataArray(np.arange(4096, dtype=np.uint16).reshape(64, 64), dims=("y", "x"), attrs={"pixel_um": 0.1})
    mask = xr.DataArray(np.arange(4096).reshape(64, 64) % 3 == 0, dims=("y", "x"))
    back = lsfov.open_result(lsfov.save(xr.Dataset({"raw": raw, "mask": mask}), tmp_path / "r.zarr"))
    assert dict(back.sizes) == {"y": 64, "x": 64} and back.raw.dtype == np.uint16 and back.mask.dtype == bool
    np.testing.assert_array_equal(back.mask.values, mask.values)
    assert back.mask.attrs["pixel_um"] == back.raw.attrs["pixel_um"] == 0.1 and "pixel_um" not in mask.attrs
    with pytest.raises(ValueError, match=r"share the y, x grid but not their pixel_um \('raw' 0.1 µm, 'm' 0.2 µm\)"):
        lsfov.save(xr.Dataset({"raw": raw, "m": mask.assign_attrs(pixel_um=0.2)}), tmp_path / "s.zarr")
    with pytest.raises(ValueError, match="its pixel_um attribute is -0.2"):  # no size: refused, not replaced
        lsfov.save(xr.Dataset({"raw": raw, "m": mask.assign_attrs(pixel_um=-0.2)}), tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    # The README's result: an array beside a map, the map's attributes the Dataset's. The image was
    # saved in pixels, its map in µm: in a viewer the map covered a fifth of it.
    psf_map = lsfov.estimate_psf_map(np.random.default_rng(0).random((256, 256)), "G1", pixel_um=0.2, fill=False)
    ds = xr.Dataset({"deblurred": (("y", "x"), np.ones((256, 256))), "sigma": psf_map["sigma"]}, attrs=psf_map.attrs)
    back = lsfov.open_result(lsfov.save(ds, tmp_path / "readme.zarr"))
    assert back.deblurred.attrs["pixel_um"] == 0.2 and back.x.attrs["units"] == back.gx.attrs["units"] == "micrometer"
    assert float(back.x[-1]) == pytest.approx(51.0) and float(back.gx[-1]) == pytest.approx(38.3)
    # A crop in its pixel indices, its pixel size said: placed in µm, as its map is (it was in pixels).
    crop = xr.DataArray(np.ones((256, 256), np.float32), dims=("y", "x"), attrs={"pixel_um": 0.2},
                        coords={"y": np.arange(100, 356), "x": np.arange(300, 556)})
    for obj in (crop, lsfov.io.with_pixel_size(crop)):
        back = lsfov.open_image(lsfov.save(obj, tmp_path / "crop.zarr", overwrite=True) / "image")
        assert back.attrs["pixel_um"] == 0.2 and back.x.attrs["units"] == "micrometer"
        np.testing.assert_allclose(back.y.values[[0, -1]], [20.0, 71.0])
        np.testing.assert_allclose(back.x.values[[0, -1]], [60.0, 111.0])
    assert lsfov.io.image_origin(crop, 0.2) == pytest.approx((20.0, 60.0))  # where its map lies


def test_result_round_trip_values_scale_translation_units(tmp_path):
    img = _image()
    grid = xr.DataArray(np.arange(12, dtype=np.float32).reshape(3, 4), dims=("gy", "gx"),
                        coords={"gy": xr.Variable("gy", [8.0, 24.0, 40.0], attrs={"units": "micrometer"}),
                                "gx": xr.Variable("gx", [8.0, 24.0, 40.0, 56.0], attrs={"units": "micrometer"})},
                        attrs={"units": "wave RMS"})
    ds = xr.Dataset({"deblurred": img, "focus": grid}, attrs={"model": "Z3"})
    out = lsfov.save(ds, tmp_path / "r.zarr")
    back = lsfov.open_result(out)
    assert list(back.data_vars) == ["deblurred", "focus"]
    np.testing.assert_array_equal(back.deblurred.values, img.values)
    np.testing.assert_allclose(back.deblurred.y.values, img.y.values)
    assert back.focus.dims == ("gy", "gx") and back.focus.attrs["units"] == "wave RMS"
    np.testing.assert_allclose(back.focus.gx.values, grid.gx.values)
    # Its NGFF scale is the nodes' spacing: not read back as a pixel size (values in pixels would be
    # converted with it), which the image's is
    assert "pixel_um" not in back.focus.attrs and back.deblurred.attrs["pixel_um"] == 0.125
    assert back.attrs["model"] == "Z3"
    meta = json.loads((out / "deblurred" / "zarr.json").read_text())["attributes"]["ome"]
    assert meta["version"] == "0.5"
    ds0 = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert ds0 == [{"type": "scale", "scale": [0.125, 0.125]}, {"type": "translation", "translation": [2.0, 0.0]}]
    assert meta["multiscales"][0]["axes"][0] == {"name": "y", "type": "space", "unit": "micrometer"}


def test_result_is_read_by_ome_zarr_own_reader(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    img = _image(1200, 1100)
    lsfov.save(img, tmp_path / "r.zarr")
    node = list(Reader(parse_url(str(tmp_path / "r.zarr" / "deblurred")))())[0]
    assert len(node.data) == 2  # a pyramid for a large image
    np.testing.assert_array_equal(np.asarray(node.data[0]), img.values)
    tr = node.metadata["coordinateTransformations"]
    assert tr[0][0]["scale"] == [0.125, 0.125]
    assert tr[1][0]["scale"] == [0.25, 0.25]
    # Level-1 pixels average 2x2 base pixels: their centres shift by half a base pixel.
    assert tr[1][1]["translation"] == pytest.approx([2.0625, 0.0625])
    np.testing.assert_allclose(np.asarray(node.data[1])[0, 0], img.values[:2, :2].mean(), rtol=1e-6)


def test_a_result_is_read_as_an_image_only_where_it_holds_one(tmp_path):
    """A result of one image (`lsfov deconvolve`'s) is that image; one of several says which there are;
    a map's node grid is no image (its scale is the nodes' spacing), nor is a variable of it."""
    img = _image(64, 80)
    grid = xr.DataArray(np.ones((3, 4), np.float32), dims=("gy", "gx"), coords={"gy": 32.0 * np.arange(3),
                                                                              "gx": 32.0 * np.arange(4)},
                        attrs={"units": "wave RMS"})
    lsfov.save(xr.Dataset({"deblurred": img, "depth": grid}), tmp_path / "one.zarr")
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "one.zarr").values, img.values)
    lsfov.save(xr.Dataset({"raw": img, "sparse": img}), tmp_path / "two.zarr")
    with pytest.raises(ValueError, match=r"variables \['raw', 'sparse'\]; open it with lsfov.open_result or open one "
                                         r"variable as .*two.zarr/<variable>$"):
        lsfov.open_image(tmp_path / "two.zarr")
    lsfov.save(xr.Dataset({"focus": grid, "axis": grid}), tmp_path / "map.zarr")
    with pytest.raises(ValueError, match="is an lsfov result on a node grid .*focus, axis.*not an image"):
        lsfov.open_image(tmp_path / "map.zarr")
    for path in (tmp_path / "map.zarr" / "focus", tmp_path / "one.zarr" / "depth"):
        with pytest.raises(ValueError, match=r"is a variable on the node grid \('gy', 'gx'\) of the result .*, not an "
                                             r"image; open it with lsfov.open_result"):
            lsfov.open_image(path)
        assert "on its node grid" in lsfov.io.describe(path) and "[wave RMS]" in lsfov.io.describe(path)
    assert lsfov.open_result(tmp_path / "one.zarr").depth.dims == ("gy", "gx")  # (what reads it as a map)
    lsfov.save(_image(64, 80, y0=2012.7), tmp_path / "stage.zarr")  # a stage offset is not rounded away
    assert "y: 2012.7..2020.575 step 0.125 micrometer" in lsfov.io.describe(tmp_path / "stage.zarr")


def test_open_image_ngff_04_and_05_and_selection(tmp_path, caplog):
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    data = np.random.default_rng(1).integers(0, 4000, (2, 3, 64, 80)).astype(np.uint16)  # (c, z, y, x)
    for fmt, name in ((FormatV04(), "v04.zarr"), (FormatV05(), "v05.zarr")):
        zf = 2 if fmt.version == "0.4" else 3
        root = zarr.open_group(str(tmp_path / name), mode="w", zarr_format=zf)
        write_image(data, root, axes="czyx", fmt=fmt, scale={"c": 1.0, "z": 0.5, "y": 0.2, "x": 0.2},
                    axes_units={"z": "micrometer", "y": "micrometer", "x": "micrometer"}, scale_factors=[])
        with pytest.raises(ValueError, match="channel="):
            lsfov.open_image(tmp_path / name)
        with pytest.raises(ValueError, match="'z'"):
            lsfov.open_image(tmp_path / name, channel=1)
        arr = lsfov.open_image(tmp_path / name, channel=1, z=2)
        assert arr.dims == ("y", "x") and isinstance(arr.data, da.Array)
        np.testing.assert_array_equal(arr.values, data[1, 2])
        assert arr.attrs["pixel_um"] == pytest.approx(0.2)
        assert arr.x.attrs["units"] == "micrometer" and arr.x.values[1] == pytest.approx(0.2)
        # which plane it is, and where: a result of one plane says so
        assert arr.attrs["plane"] == {"c": 1, "z": 2} and arr.attrs["z_um"] == pytest.approx(1.0)
        assert lsfov.open_image(tmp_path / name, channel=-1, z=-3).attrs["plane"] == {"c": 1, "z": 0}
        assert "z: 0..1 step 0.5 micrometer" in lsfov.io.describe(tmp_path / name)
        with pytest.raises(ValueError, match="out of range"):
            lsfov.open_image(tmp_path / name, channel=5, z=0)
    # the same in nanometres: every axis given in µm (z's too, where a plane lies)
    root = zarr.open_group(str(tmp_path / "nm.zarr"), mode="w", zarr_format=3)
    write_image(data, root, axes="czyx", fmt=FormatV05(), scale={"c": 1.0, "z": 500.0, "y": 200.0, "x": 200.0},
                axes_units={a: "nanometer" for a in "zyx"}, scale_factors=[])
    arr = lsfov.open_image(tmp_path / "nm.zarr", channel=1, z=2)
    assert arr.attrs["pixel_um"] == pytest.approx(0.2) and arr.attrs["z_um"] == pytest.approx(1.0)
    assert "z: 0..1 step 0.5 micrometer" in lsfov.io.describe(tmp_path / "nm.zarr")
    assert not [r for r in caplog.records if "version mismatch" in r.getMessage()]  # ome-zarr's note at each read


def test_open_tiff_and_npy(tmp_path):
    data = np.random.default_rng(2).integers(0, 255, (1, 50, 60)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data, imagej=True, resolution=(1 / 0.3, 1 / 0.3), metadata={"unit": "um"})
    arr = lsfov.open_image(tmp_path / "a.tif")
    assert arr.shape == (50, 60) and "plane" not in arr.attrs  # a single plane is no plane of a larger image
    np.testing.assert_array_equal(arr.values, data[0])
    assert arr.attrs["pixel_um"] == pytest.approx(0.3)
    np.save(tmp_path / "b.npy", data[0].astype(np.float32))
    b = lsfov.open_image(tmp_path / "b.npy")
    assert b.attrs["pixel_um"] is None and b.x.attrs["units"] == "pixel"
    # its graph holds the file's name, not its pixels (a memory map pickles as all of them: Dask's
    # "Sending large graph" on a cluster, the whole image to every worker), and reads it back
    import pickle

    big = np.random.default_rng(4).random((512, 512)).astype(np.float32)
    np.save(tmp_path / "big.npy", big)
    lazy = lsfov.open_image(tmp_path / "big.npy").data
    assert len(pickle.dumps(dict(lazy.__dask_graph__()))) < 10_000
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lazy)).compute(), big)
    assert lazy.name == lsfov.open_image(tmp_path / "big.npy").data.name  # one name per file (a resumed run's)
    rgb = np.random.default_rng(3).random((40, 30, 3)).astype(np.float32)  # (y, x, colour), as skimage holds it
    np.save(tmp_path / "rgb.npy", rgb)
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "rgb.npy", channel=2).values, rgb[..., 2])
    # the z step of OME and ImageJ TIFFs: which plane, and where
    stack = np.zeros((5, 16, 16), np.uint16)
    tifffile.imwrite(tmp_path / "s.ome.tif", stack, metadata={"axes": "ZYX", "PhysicalSizeZ": 500,
                                                              "PhysicalSizeZUnit": "nm"})
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX", "spacing": 0.3, "unit": "um"})
    assert lsfov.open_image(tmp_path / "s.ome.tif", z=3).attrs["z_um"] == pytest.approx(1.5)
    # ... and their time step (OME's TimeIncrement, ImageJ's finterval): when a time point was taken
    series = np.zeros((4, 16, 16), np.uint16)
    tifffile.imwrite(tmp_path / "t.ome.tif", series, metadata={"axes": "TYX", "TimeIncrement": 0.5,
                                                               "TimeIncrementUnit": "min"})
    tifffile.imwrite(tmp_path / "t.tif", series, imagej=True, metadata={"axes": "TYX", "finterval": 30})
    assert {k: v for k, v in lsfov.open_image(tmp_path / "t.ome.tif", t=3).attrs.items() if k[0] == "t"} == \
        {"t": 1.5, "t_units": "minute"}
    assert {k: v for k, v in lsfov.open_image(tmp_path / "t.tif", t=2).attrs.items() if k[0] == "t"} == \
        {"t": 60.0, "t_units": "second"}
    assert "t: 0..90 step 30 second" in lsfov.io.describe(tmp_path / "t.tif")
    tifffile.imwrite(tmp_path / "t0.tif", series, imagej=True, metadata={"axes": "TYX"})  # no step: no time said
    assert "t" not in lsfov.open_image(tmp_path / "t0.tif", t=2).attrs
    tifffile.imwrite(tmp_path / "b16.ome.tif", stack, metadata={"axes": "ZYX", "SignificantBits": 16})
    assert "significant_bits" not in lsfov.open_image(tmp_path / "b16.ome.tif", z=3).attrs  # 16 of 16: nothing to say
    # a 12-bit camera in 16-bit pixels (OME's SignificantBits): where it saturates, for the PSF map
    tifffile.imwrite(tmp_path / "b12.ome.tif", stack, metadata={"axes": "ZYX", "SignificantBits": 12})
    assert lsfov.open_image(tmp_path / "b12.ome.tif", z=1).attrs["significant_bits"] == 12
    assert "saturates at 4095 (12 significant bits)" in lsfov.io.describe(tmp_path / "b12.ome.tif")
    assert "saturates at 65535 (its type's largest count)" in lsfov.io.describe(tmp_path / "b16.ome.tif")
    assert lsfov.open_image(tmp_path / "s.tif", z=3).attrs["z_um"] == pytest.approx(0.9)
    assert "z: 0..1.2 step 0.3 micrometer" in lsfov.io.describe(tmp_path / "s.tif")
    # images appended one by one (each a series of its own): all of them, as pages, not the first only
    for k, plane in enumerate(np.random.default_rng(4).random((3, 20, 24)).astype(np.float32)):
        tifffile.imwrite(tmp_path / "appended.tif", plane, append=True)
        tifffile.imwrite(tmp_path / "mixed.tif", plane[: 20 - k], append=True)
    appended = lsfov.open_image(tmp_path / "appended.tif", z=2)
    np.testing.assert_array_equal(appended.values, np.random.default_rng(4).random((3, 20, 24)).astype(np.float32)[2])
    assert "shape (3, 20, 24) float32 dims ('z', 'y', 'x')" in lsfov.io.describe(tmp_path / "appended.tif")
    assert "saturates" not in lsfov.io.describe(tmp_path / "appended.tif")  # a float image: no clip of its own
    with pytest.raises(ValueError, match="3 images of shapes"):
        lsfov.open_image(tmp_path / "mixed.tif")
    tifffile.imwrite(tmp_path / "types.tif", plane, append=True)
    tifffile.imwrite(tmp_path / "types.tif", plane.astype(np.uint16), append=True)
    with pytest.raises(ValueError, match=r"2 images of shape \(20, 24\) and types \['float32', 'uint16'\]"):
        lsfov.open_image(tmp_path / "types.tif")



def test_pyramidal_tiffs_are_read_lazily_level_by_level(tmp_path):
    """A whole-slide OME-TIFF is a pyramid (SubIFDs): its full-resolution level is read chunk by chunk
    (tifffile opens the series as a zarr group, which a plain read would take whole), any level can be
    chosen, and a level's pixel is as much larger as the level is smaller."""
    import pickle

    data = np.random.default_rng(6).integers(0, 4000, (512, 768)).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "slide.ome.tif", ome=True) as tif:
        tif.write(data, subifds=2, tile=(128, 128), metadata={"axes": "YX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        for k in (2, 4):
            tif.write(data[::k, ::k], subfiletype=1, tile=(128, 128))
    full = lsfov.open_image(tmp_path / "slide.ome.tif")
    assert any(isinstance(v, lsfov.io._TiffSeries) for v in dict(full.data.dask).values())  # read when computed
    assert full.attrs["pixel_um"] == pytest.approx(0.25)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(full)).values, data)
    half = lsfov.open_image(tmp_path / "slide.ome.tif", level=1)
    np.testing.assert_array_equal(half.values, data[::2, ::2])
    assert half.attrs["pixel_um"] == pytest.approx(0.5) and half.x.values[1] == pytest.approx(0.5)
    assert half.data.name != full.data.name
    assert lsfov.open_image(tmp_path / "slide.ome.tif", level=2).shape == (128, 192)
    assert "pyramid: 3 levels, 512x768 256x384 128x192" in lsfov.io.describe(tmp_path / "slide.ome.tif")
    with pytest.raises(ValueError, match=r"pyramid level 3 does not exist \(levels 0..2\)"):
        lsfov.open_image(tmp_path / "slide.ome.tif", level=3)
    tifffile.imwrite(tmp_path / "flat.tif", data)
    with pytest.raises(ValueError, match=r"level 1 does not exist \(levels 0..0\)"):
        lsfov.open_image(tmp_path / "flat.tif", level=1)


def test_tiffs_of_thin_strips_are_read_in_large_blocks(tmp_path):
    """A TIFF of one-row strips (or small tiles) is read a block of many strips per task, not a task
    per strip: 3000 rows made 3000 tasks, each costing more to schedule than to read."""
    data = np.random.default_rng(7).integers(0, 4000, (2, 3000, 2500)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "strips.tif", data, rowsperstrip=1, metadata={"axes": "CYX"})
    arr = lsfov.open_image(tmp_path / "strips.tif", channel=1)
    assert arr.data.chunks == ((2048, 952), (2048, 452)) and len(arr.data.__dask_graph__()) < 30
    np.testing.assert_array_equal(arr.values, data[1])
    # an OME-Zarr of small chunks too (its levels: the NGFF reader's own chunks are each read whole)
    lsfov.save(xr.DataArray(data[1], dims=("y", "x")), tmp_path / "small.zarr", chunks=128)
    ngff = lsfov.open_image(tmp_path / "small.zarr/image")
    assert ngff.data.chunks == ((2048, 952), (2048, 452)) and len(ngff.data.__dask_graph__()) < 30
    np.testing.assert_array_equal(ngff.values, data[1])
    half = lsfov.open_image(tmp_path / "small.zarr/image", level=1)
    assert half.shape == (1500, 1250) and half.attrs["pixel_um"] is None
    np.testing.assert_array_equal(half.values, zarr.open_array(str(tmp_path / "small.zarr/image/1"))[:])
    tifffile.imwrite(tmp_path / "tiles.tif", data[0], tile=(96, 160))
    tiles = lsfov.open_image(tmp_path / "tiles.tif")
    assert tiles.data.chunksize == (96 * 21, 160 * 12) and len(tiles.data.__dask_graph__()) < 30  # whole tiles
    np.testing.assert_array_equal(tiles.values, data[0])


def test_tiff_images_travel_to_other_processes(tmp_path, monkeypatch):
    # a distributed worker or a SLURM job gets the image's graph pickled: tifffile's zarr store holds an
    # open file and a lock, which do not pickle; the path does
    import pickle

    data = np.random.default_rng(5).random((3, 70, 50)).astype(np.float32)
    tifffile.imwrite(tmp_path / "one.tif", data[0])
    tifffile.imwrite(tmp_path / "stack.tif", data, photometric="minisblack", metadata={"axes": "ZYX"})
    for k, plane in enumerate(data):
        tifffile.imwrite(tmp_path / "appended.tif", plane, append=True)
    for name, kw, want in (("one.tif", {}, data[0]), ("stack.tif", {"z": 1}, data[1]), ("appended.tif", {"z": 2}, data[2])):
        arr = lsfov.open_image(tmp_path / name, **kw)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(arr)).values, want)
        assert lsfov.open_image(tmp_path / name, **kw).data.name == arr.data.name  # a resumed run finds its chunks
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_array_equal(lsfov.open_image(tmp_path / "stack.tif", z=2).values, data[2])
    # a relative name is made absolute (workers may start elsewhere), and names the same file as the absolute one
    monkeypatch.chdir(tmp_path)
    rel = lsfov.io.open_planes("appended.tif")
    assert rel[0].data.name == lsfov.io.open_planes(tmp_path / "appended.tif")[0].data.name
    monkeypatch.chdir(tmp_path.parent)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(rel[1])).values, data[1])


def test_tiff_files_are_read_right_by_forked_and_threaded_readers_and_closed_after(tmp_path):
    """One open file per process: a forked child must not share the parent's (their offsets move each
    other's reads), many files read by threads at once stay open while read, and a file closes when the
    last image of it goes."""
    import gc

    rng = np.random.default_rng(7)
    big = rng.random((512, 512)).astype(np.float32)
    tifffile.imwrite(tmp_path / "tiled.tif", big, tile=(64, 64))
    arr = lsfov.open_image(tmp_path / "tiled.tif")
    np.testing.assert_array_equal(arr.values[:64, :64], big[:64, :64])  # the parent has read: its file is open
    with dask.config.set({"scheduler": "processes", "num_workers": 2, "multiprocessing.context": "fork"}):
        np.testing.assert_array_equal(arr.data.compute(), big)
    small = rng.random((80, 16, 16)).astype(np.float32)
    for i, plane in enumerate(small):
        tifffile.imwrite(tmp_path / f"s{i}.tif", plane, tile=(16, 16))
    stack = da.stack([lsfov.open_image(tmp_path / f"s{i}.tif").data for i in range(80)])
    np.testing.assert_array_equal(stack.compute(scheduler="threads", num_workers=8), small)
    if os.path.isdir("/proc/self/fd"):
        def open_files():
            return {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}

        assert str(tmp_path / "tiled.tif") in open_files()
        del arr, stack
        gc.collect()
        assert not {f for f in open_files() if f.startswith(str(tmp_path))}
    # a file rewritten after it was opened: a process opening it then says so rather than read another layout
    import pickle

    sent = pickle.dumps(lsfov.open_image(tmp_path / "s0.tif").data)
    gc.collect()
    tifffile.imwrite(tmp_path / "s0.tif", np.zeros((20, 20), np.float32))
    with pytest.raises(ValueError, match="s0.tif changed after it was opened"):
        pickle.loads(sent).compute()


def test_pixel_sizes_that_lsfov_cannot_use_are_not_guessed(tmp_path):
    img = np.random.default_rng(6).random((40, 30)).astype(np.float32)
    # 72 dots per inch is a display default, not a microscope's 353 µm pixel: unknown, not 353
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(72, 72), resolutionunit="INCH")
    assert lsfov.open_image(tmp_path / "dpi.tif").attrs["pixel_um"] is None
    tifffile.imwrite(tmp_path / "cm.tif", img, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    assert lsfov.open_image(tmp_path / "cm.tif").attrs["pixel_um"] == pytest.approx(0.25)
    # non-square pixels: each axis keeps its own scale (viewers show the right shape), and anything that
    # needs one pixel size says what to do instead of taking x's
    tifffile.imwrite(tmp_path / "an.ome.tif", img, metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.4})
    lsfov.save(xr.Dataset({"im": xr.DataArray(img, dims=("y", "x"), coords={
        "y": ("y", 0.4 * np.arange(40), {"units": "micrometer"}), "x": ("x", 0.2 * np.arange(30), {"units": "micrometer"})})}),
        tmp_path / "an.zarr")
    for src in (tmp_path / "an.ome.tif", tmp_path / "an.zarr" / "im"):
        an = lsfov.open_image(src)
        assert an.attrs["pixel_um"] is None
        assert float(an.y[1] - an.y[0]) == pytest.approx(0.4) and float(an.x[1] - an.x[0]) == pytest.approx(0.2)
        with pytest.raises(ValueError, match=r"not square \(y 0.4 µm, x 0.2 µm\).*--pixel-um"):
            lsfov.estimate_psf_map(an, "G1")
        assert lsfov.io.with_pixel_size(an, 0.2).attrs["pixel_um"] == 0.2  # the user's word overrides the file's
        with pytest.raises(ValueError, match=r"\(y 0.4 µm, x 0.2 µm\)"):  # axes by name, also in (x, y) order
            lsfov.io.pixel_size(an.T)
        # PSFs in the image's own pixels (a measured PSF, an operator of its own beads): nothing to compare
        op = lsfov.ProductConvolution.from_grid(lsfov.psf.gaussian(1.0, 1.0, size=5)[None, None], an.shape)
        assert lsfov.deconvolve(an, op, 2).shape == an.shape
    # a real pixel size in dots per inch (0.1 µm: 254000 dpi) is kept
    tifffile.imwrite(tmp_path / "fine.tif", img, resolution=(254000, 254000), resolutionunit="INCH")
    assert lsfov.open_image(tmp_path / "fine.tif").attrs["pixel_um"] == pytest.approx(0.1)
    tifffile.imwrite(tmp_path / "sq.ome.tif", img, metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2005})
    assert lsfov.open_image(tmp_path / "sq.ome.tif").attrs["pixel_um"] == pytest.approx(0.2)  # rounding is no anisotropy


def test_open_a_bare_zarr_array(tmp_path):
    import dask.array as da

    data = np.random.default_rng(3).random((2, 40, 30)).astype(np.float32)
    da.from_array(data, chunks=(1, 20, 30)).to_zarr(str(tmp_path / "bare.zarr"))
    arr = lsfov.open_image(tmp_path / "bare.zarr", z=1)
    assert arr.dims == ("y", "x") and arr.x.attrs["units"] == "pixel" and arr.attrs["pixel_um"] is None
    np.testing.assert_array_equal(arr.values, data[1])
    da.zeros(5, chunks=5).to_zarr(str(tmp_path / "line.zarr"))
    with pytest.raises(ValueError, match="1 dimension"):
        lsfov.open_image(tmp_path / "line.zarr")


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        lsfov.open_image(tmp_path / "missing.zarr")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        lsfov.open_image(tmp_path / "notes.txt")
    (tmp_path / "fake.tif").write_text("not a tiff")
    with pytest.raises(ValueError, match="not a readable TIFF"):
        lsfov.open_image(tmp_path / "fake.tif")
    np.save(tmp_path / "vol.npy", np.zeros((3, 4, 5, 6, 7, 8)))
    with pytest.raises(ValueError, match="at most 5"):
        lsfov.open_image(tmp_path / "vol.npy")
    np.save(tmp_path / "c.npy", np.ones((8, 8), np.complex64))  # once opened, to fail at its first use
    with pytest.raises(TypeError, match="holds complex64 values; lsfov reads real intensity images"):
        lsfov.open_image(tmp_path / "c.npy")
    with pytest.raises(ValueError, match="not an lsfov result"):
        lsfov.open_result(tmp_path)
    # One variable of a finished result, as the README opens images: it is not an interrupted run.
    lsfov.save(_image(32, 32), tmp_path / "r.zarr")
    with pytest.raises(ValueError, match=r"r.zarr/deblurred is one variable \(deblurred\) of the result .*r.zarr: "
                                         r"pass .*r.zarr, or open this image alone with lsfov.open_image"):
        lsfov.open_result(tmp_path / "r.zarr" / "deblurred")
    assert lsfov.open_image(tmp_path / "r.zarr" / "deblurred").shape == (32, 32)
    lsfov.save(xr.Dataset({"focus": (("gy", "gx"), np.ones((2, 3), np.float32))}), tmp_path / "m.zarr")
    with pytest.raises(ValueError, match=r"of the result .*m.zarr: pass .*m.zarr$"):  # no image to open alone
        lsfov.open_result(tmp_path / "m.zarr" / "focus")
    for bad in (5, None):
        with pytest.raises(TypeError, match="path must be a file or directory name"):
            lsfov.open_result(bad)
        with pytest.raises(TypeError, match="path must be a file or directory name"):
            lsfov.save(_image(8, 8), bad)
    with pytest.raises(ValueError, match="path is empty"):
        lsfov.open_image("")


def test_damaged_store_metadata_is_named(tmp_path):
    lsfov.save(_image(32, 32), tmp_path / "r.zarr")
    img = tmp_path / "r.zarr" / "deblurred"
    meta = img / "0" / "zarr.json"
    text = meta.read_text()
    meta.write_text(text[:40])  # cut short
    with pytest.raises(ValueError, match=r"deblurred/0/zarr.json is damaged \(not JSON"):
        lsfov.open_image(img)
    meta.unlink()
    with pytest.raises(ValueError, match=r"deblurred/0: the array of pyramid level 0 has no metadata"):
        lsfov.open_image(img)
    meta.write_text(text)
    (img / "zarr.json").write_text("{")
    with pytest.raises(ValueError, match=r"deblurred/zarr.json is damaged"):
        lsfov.open_image(img)


def test_files_as_acquisition_software_writes_them(tmp_path, caplog):
    """A review with real writers' files: Fiji's escaped micro sign, each image of a plain TIFF at its
    own resolution, ImageJ's "inch" at 72 dpi, OME channel names, a z-stack stored as RGB, BigTIFF's
    suffix, xarray's named zarr axes, and an OME-Zarr's labels."""
    rng = np.random.default_rng(0)
    hyper = rng.integers(0, 1000, (2, 3, 2, 32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "fiji.tif", hyper, imagej=True, resolution=(5, 5),
                     metadata={"axes": "TZCYX", "spacing": 0.5, "unit": "\\u00B5m", "finterval": 2.0})
    im = lsfov.open_image(tmp_path / "fiji.tif", channel=0, z=1, t=1)
    assert im.attrs["pixel_um"] == pytest.approx(0.2) and im.attrs["z_um"] == pytest.approx(0.5)
    stack = rng.random((2, 32, 32)).astype(np.float32)
    with tifffile.TiffWriter(tmp_path / "two.tif") as tw:  # two images, 0.1 and 0.4 µm pixels
        for part, per_cm in ((stack, 1e5), (stack[:, :16], 2.5e4)):
            tw.write(part, photometric="minisblack", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                     metadata={"axes": "ZYX"})
    assert [lsfov.open_image(tmp_path / "two.tif", series=k, z=0).attrs["pixel_um"] for k in (0, 1)] == \
        pytest.approx([0.1, 0.4])
    tifffile.imwrite(tmp_path / "inch.tif", stack, imagej=True, resolution=(72, 72),
                     metadata={"unit": "inch", "spacing": 1 / 72, "axes": "ZYX"})
    inch = lsfov.open_image(tmp_path / "inch.tif", z=1)
    assert inch.attrs["pixel_um"] is None and "z_um" not in inch.attrs  # a display setting, not 353 µm
    with tifffile.TiffWriter(tmp_path / "c.ome.tif", ome=True) as tw:  # two positions, their channels named apart
        for names in (["DAPI", "GFP", "R&D"], ["a", "b", "c"]):
            tw.write(rng.random((2, 3, 32, 32)).astype(np.float32), photometric="minisblack",
                     metadata={"axes": "ZCYX", "Channel": {"Name": names}})
    assert lsfov.open_image(tmp_path / "c.ome.tif", channel=2, z=0, series=0).attrs["channel"] == "R&D"
    assert lsfov.open_image(tmp_path / "c.ome.tif", channel=1, z=0, series=1).attrs["channel"] == "b"
    tifffile.imwrite(tmp_path / "cs.ome.tif", (rng.random((2, 16, 16, 3)) * 255).astype(np.uint8), photometric="rgb",
                     metadata={"axes": "CYXS"})
    with pytest.raises(ValueError, match=r"channels of colour samples \(axes CYXS\).*save each colour as a channel"):
        lsfov.open_image(tmp_path / "cs.ome.tif", channel=1)
    tifffile.imwrite(tmp_path / "rgb.tif", (stack[:1].repeat(3, 0) * 255).astype(np.uint8), photometric="rgb",
                     planarconfig="separate")  # (what tifffile's default for 3 planes does, without its warning)
    with pytest.raises(ValueError, match="3 elements along 'c'.*write it with photometric='minisblack'"):
        lsfov.open_image(tmp_path / "rgb.tif")
    with pytest.raises(ValueError, match=r"3 elements along 'c'; choose one with channel= \(--channel\)$"):
        lsfov.open_image(tmp_path / "c.ome.tif", z=0, series=0)  # (stored as planes: no such hint)
    shutil.copy(tmp_path / "fiji.tif", tmp_path / "big.btf")
    assert lsfov.open_image(tmp_path / "big.btf", channel=0, z=0, t=0).attrs["pixel_um"] == pytest.approx(0.2)
    xr.Dataset({"img": (("c", "y", "x"), stack)}).to_zarr(tmp_path / "xr.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(ValueError, match="2 elements along 'c'"):  # its c is no z
        lsfov.open_image(tmp_path / "xr.zarr" / "img")
    assert lsfov.open_image(tmp_path / "xr.zarr" / "img", channel=1).attrs["plane"] == {"c": 1}
    xr.Dataset({"img": (("time", "y", "x"), stack)}).to_zarr(tmp_path / "v2.zarr", zarr_format=2, consolidated=False)
    assert lsfov.open_image(tmp_path / "v2.zarr" / "img", t=1).attrs["plane"] == {"t": 1}  # (xarray's time: t)
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image, write_labels

    root = zarr.open_group(str(tmp_path / "lab.zarr"), mode="w", zarr_format=3)
    write_image(stack[0], root, axes="yx", fmt=FormatV05(), scale_factors=[])
    write_labels((stack[0] > 0.5).astype(np.uint8), root, name="cells", axes="yx", fmt=FormatV05(), scale_factors=[])
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ome_zarr"):
        lsfov.open_image(tmp_path / "lab.zarr")
    assert not any("no parent found" in r.getMessage() for r in caplog.records)
    for path, what in (("lab.zarr/labels/cells", r"a label image \(a segmentation\)"),
                       ("lab.zarr/labels", "the labels group")):
        with pytest.raises(ValueError, match=f"{what} of the OME-Zarr image .*lab.zarr, not an intensity image"):
            lsfov.open_image(tmp_path / path)
    with pytest.raises(ValueError, match=r"is a level of the label image \(a segmentation\) .*cells, not an intensity"):
        lsfov.open_image(tmp_path / "lab.zarr/labels/cells/s0")
    # ome-zarr's own users in the process (napari, scripts) still hear it: only lsfov's reads are hushed
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="ome_zarr"):
        list(Reader(parse_url(str(tmp_path / "lab.zarr")))())
    assert any("no parent found" in r.getMessage() for r in caplog.records)


def test_planes_keep_where_they_lie_and_a_stack_rebuilt_from_them_knows_its_axis(tmp_path):
    """open_image(z=i) keeps the plane's z (and channel name) as 0-D coordinates, as .sel does: planes
    deblurred one by one and put back with xr.concat make a stack with its z values, saved without the
    first plane's attributes (it is no longer that plane)."""
    tifffile.imwrite(tmp_path / "zs.ome.tif", np.random.default_rng(0).random((3, 2, 32, 32)).astype(np.float32),
                     metadata={"axes": "ZCYX", "PhysicalSizeZ": 0.5, "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2,
                               "Channel": {"Name": ["a", "b"]}})
    planes = [lsfov.open_image(tmp_path / "zs.ome.tif", z=i, channel=1) for i in range(3)]
    assert planes[1].coords["z"].item() == 0.5 and "c" not in planes[1].coords  # (the name: in the attrs)
    assert planes[1].attrs["plane"] == {"c": 1, "z": 1} and planes[1].attrs["z_um"] == 0.5
    assert planes[1].attrs["channel"] == "b"
    lsfov.save(xr.concat(planes, "z").rename("img"), tmp_path / "st.zarr")
    back = lsfov.open_result(tmp_path / "st.zarr")["img"]
    np.testing.assert_allclose(back.z.values, [0.0, 0.5, 1.0])
    assert back.attrs["plane"] == {"c": 1} and back.attrs["channel"] == "b" and "z_um" not in back.attrs
    # Channels of one plane merge into one Dataset (their names differ only in the attributes)
    two = xr.Dataset({"dapi": lsfov.open_image(tmp_path / "zs.ome.tif", z=0, channel=0),
                      "gfp": lsfov.open_image(tmp_path / "zs.ome.tif", z=0, channel=1)})
    assert two.gfp.attrs["channel"] == "b"
    # Along an axis of another name, which planes it holds is unknown: none of the first's attrs
    with pytest.warns(lsfov.LsfovWarning, match="coordinate"):  # (its z values have no place in NGFF)
        lsfov.save(xr.concat(planes, "plane").rename("img"), tmp_path / "pl.zarr")
    kept = lsfov.open_result(tmp_path / "pl.zarr")["img"].attrs
    assert not {"plane", "z_um", "channel"} & set(kept), kept
    lsfov.save(planes[2].rename("one"), tmp_path / "one.zarr")  # one plane: as it was
    one = lsfov.open_result(tmp_path / "one.zarr")["one"]
    assert one.coords["z"].item() == 1.0 and one.attrs["plane"] == {"c": 1, "z": 2} and one.attrs["z_um"] == 1.0


def test_ome_tiffs_of_several_images_are_positions_not_a_stack(tmp_path):
    """An OME-TIFF of several Image elements (stage positions, fields of view) is not read as a
    z-stack: one is chosen (series=, --series), each with its own pixel size; info lists them; a
    bead stack takes all their planes. Images appended to a plain TIFF stay a z-stack's pages."""
    rng = np.random.default_rng(8)
    a, b = rng.integers(0, 4000, (2, 64, 80)).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "pos.ome.tif", ome=True) as tw:
        tw.write(a, metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "Name": "well A1"})
        tw.write(b[:48], metadata={"axes": "YX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4, "Name": "well B2",
                                   "SignificantBits": 12})
    with pytest.raises(ValueError, match=r"pos.ome.tif: 2 images in this OME-TIFF \(well A1, well B2\); choose one "
                                         r"with series= \(--series\)"):
        lsfov.open_image(tmp_path / "pos.ome.tif")
    first, second = (lsfov.open_image(tmp_path / "pos.ome.tif", series=k) for k in (0, 1))
    np.testing.assert_array_equal(first.values, a)
    np.testing.assert_array_equal(second.values, b[:48])
    assert first.attrs["pixel_um"] == pytest.approx(0.2) and second.attrs["pixel_um"] == pytest.approx(0.4)
    assert "significant_bits" not in first.attrs and second.attrs["significant_bits"] == 12  # each its own
    last = lsfov.open_image(tmp_path / "pos.ome.tif", series=-1)
    assert first.attrs["plane"] == {"series": 0} and last.shape == (48, 80) and last.attrs["plane"] == {"series": 1}
    info = lsfov.io.describe(tmp_path / "pos.ome.tif")
    assert "2 images (choose one with series= / --series)" in info and "series 1: shape (48, 80) uint16" in info
    assert "pixel size 0.4 µm; saturates at 4095 (12 significant bits)" in info  # each its own clip
    assert [p.shape for p in lsfov.io.open_planes(tmp_path / "pos.ome.tif")] == [(64, 80), (48, 80)]
    with pytest.raises(ValueError, match=r"series=2 \(--series\) out of range; the file has 2 image\(s\)"):
        lsfov.open_image(tmp_path / "pos.ome.tif", series=2)
    for plane in (a, b):
        tifffile.imwrite(tmp_path / "appended.tif", plane, append=True)
    assert lsfov.open_image(tmp_path / "appended.tif", z=1).attrs["plane"] == {"z": 1}  # pages of one stack
    np.testing.assert_array_equal(lsfov.open_image(tmp_path / "appended.tif", series=1).values, b)
    np.save(tmp_path / "one.npy", a)
    with pytest.raises(ValueError, match="picks an image of a TIFF of several; this is one image"):
        lsfov.open_image(tmp_path / "one.npy", series=1)
    with pytest.raises(TypeError, match="series must be an integer"):
        lsfov.open_image(tmp_path / "pos.ome.tif", series="1")


def test_a_multi_file_ome_tiff_is_whole_and_a_read_error_is_not_damage(tmp_path, monkeypatch):
    """A Micro-Manager or Bio-Formats OME-TIFF split over files: each page's data lie in its own
    file, so none is "cut short". An error of the system while reading (out of memory, a network
    file system) is that error, not a damaged file."""
    import uuid

    ua, ub = (f"urn:uuid:{uuid.uuid4()}" for _ in range(2))
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
           f'UUID="{ua}"><Image ID="Image:0" Name="a"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint16" '
           'SizeX="64" SizeY="64" SizeZ="1" SizeC="1" SizeT="2" PhysicalSizeX="0.2" PhysicalSizeY="0.2">'
           '<Channel ID="Channel:0:0" SamplesPerPixel="1"/>'
           f'<TiffData FirstT="0" IFD="0" PlaneCount="1"><UUID FileName="a.ome.tif">{ua}</UUID></TiffData>'
           f'<TiffData FirstT="1" IFD="0" PlaneCount="1"><UUID FileName="b.ome.tif">{ub}</UUID></TiffData>'
           '</Pixels></Image></OME>')
    tifffile.imwrite(tmp_path / "a.ome.tif", np.ones((64, 64), np.uint16), description=xml, metadata=None)
    # the second file's data far beyond the first file's end
    tifffile.imwrite(tmp_path / "b.ome.tif", np.full((64, 64), 2, np.uint16),
                     description=xml.replace(f'UUID="{ua}"', f'UUID="{ub}"') + " " * 200000, metadata=None)
    assert (tmp_path / "b.ome.tif").stat().st_size > 20 * (tmp_path / "a.ome.tif").stat().st_size
    second = lsfov.open_image(tmp_path / "a.ome.tif", t=1)
    assert float(second.mean()) == 2.0 and second.attrs["pixel_um"] == pytest.approx(0.2)
    img = lsfov.open_image(tmp_path / "a.ome.tif", t=0)

    def no_memory(self, series, level=None):
        raise MemoryError("Unable to allocate 3.2 GiB")

    monkeypatch.setattr(lsfov.io._TiffEntry, "array", no_memory)
    with pytest.raises(MemoryError, match="3.2 GiB"):
        img.values


def test_damaged_tiffs_are_refused_naming_the_file(tmp_path):
    """A TIFF of a header only, one cut short (a partial copy: tifffile opens and describes it as
    whole) and one with a damaged compressed tile: one clear error each, never a traceback of
    tifffile's or zlib's internals."""
    data = np.random.default_rng(0).integers(0, 4000, (256, 256)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "z.tif", data, tile=(128, 128), compression="zlib")
    whole = (tmp_path / "z.tif").read_bytes()
    (tmp_path / "header.tif").write_bytes(whole[:8])
    with pytest.raises(ValueError, match="header.tif: no image in this TIFF"):
        lsfov.open_image(tmp_path / "header.tif")
    (tmp_path / "cut.tif").write_bytes(whole[:-100])
    with pytest.raises(ValueError, match=r"cut.tif: cut short \(\d+ bytes; its pixel data run to \d+\)"):
        lsfov.open_image(tmp_path / "cut.tif")
    with pytest.raises(ValueError, match="cut short"):
        lsfov.io.describe(tmp_path / "cut.tif")
    # A z-stack tifffile writes as one block (its pages after the first not even listed when cut)
    tifffile.imwrite(tmp_path / "stack.tif", np.ones((5, 64, 64), np.float32))
    (tmp_path / "cutstack.tif").write_bytes((tmp_path / "stack.tif").read_bytes()[:30000])
    for read in (lsfov.open_image, lsfov.io.describe):
        with pytest.raises(ValueError, match=r"cutstack.tif: cut short \(30000 bytes; its pixel data run to \d+\)"):
            read(tmp_path / "cutstack.tif")
    assert lsfov.open_image(tmp_path / "stack.tif", z=4).shape == (64, 64)
    with tifffile.TiffFile(tmp_path / "z.tif") as tf:
        at = tf.pages[0].dataoffsets[1]
    (tmp_path / "bad.tif").write_bytes(whole[:at + 10] + b"\xff" * 30 + whole[at + 40:])
    img = lsfov.open_image(tmp_path / "bad.tif")  # its layout is whole: refused where the tile is read
    with pytest.raises(ValueError, match=r"bad.tif: its pixels cannot be read \(zlib.error: .*damaged or cut short"):
        img.values


def test_a_second_writer_of_a_result_is_refused(tmp_path):
    """Two writers of one result: the second is refused while the first holds its lock (it would
    remove the first's partial directory as stale and then lose to it); a lock left by a run that
    died (its process gone here, or not renewed for minutes elsewhere) is taken over."""
    import socket
    import time

    path, lock = tmp_path / "r.zarr", tmp_path / ".r.zarr.lock"
    (tmp_path / ".r.zarr.partial-0123abcd").mkdir()  # the other writer's work
    lock.write_text(f"{socket.gethostname()} {os.getppid()}\n")  # another live process
    with pytest.raises(FileExistsError, match=r"r.zarr is being written by another run \(process \d+ on "):
        lsfov.save(_image(64, 64), path)
    assert (tmp_path / ".r.zarr.partial-0123abcd").is_dir() and not path.exists()
    lock.write_text("node-17 4242\n")  # another node's job, renewed just now
    with pytest.raises(FileExistsError, match="process 4242 on node-17"):
        lsfov.save(_image(64, 64), path)
    old = time.time() - 600  # ... then not renewed for 10 minutes: that job is dead
    os.utime(lock, (old, old))
    lsfov.save(_image(64, 64), path)
    lock.write_text(f"{socket.gethostname()} 999999999\n")  # no such process here
    lsfov.save(_image(64, 64), path, overwrite=True)
    lock.write_text("")  # a lock whose writing never finished (a full disk), a minute old
    os.utime(lock, (time.time() - 60, time.time() - 60))
    lsfov.save(_image(64, 64), path, overwrite=True)
    assert lsfov.open_result(path).deblurred.shape == (64, 64)
    assert not lock.exists() and not list(tmp_path.glob(".r.zarr.partial-*")) and not list(tmp_path.glob(".r.zarr.lock*"))
    # Another thread of this process is another writer too; the lock's own thread may nest.
    import threading

    from lsfov.io import output_lock

    said = []
    with output_lock(path):
        with output_lock(path):  # the CLI holds it over a run that then saves
            pass
        worker = threading.Thread(target=lambda: said.append(_refusal(lambda: lsfov.save(_image(8, 8), path,
                                                                                         overwrite=True))))
        worker.start()
        worker.join()
    assert "being written by another thread" in said[0] and not lock.exists()


def _refusal(call):
    try:
        call()
    except FileExistsError as e:
        return str(e)
    return ""


def test_variables_sharing_work_are_computed_together(tmp_path):
    """Saving a lazy deblurred image beside what is derived from it (or beside its raw image) runs the
    work they share once, not once per variable; pyramid levels are read back from the store."""
    calls = []

    def costly(block):
        calls.append(block.shape)
        return block * 2

    base = da.from_array(np.random.default_rng(0).random((1100, 1100)).astype(np.float32), chunks=550)
    d = xr.DataArray(base.map_blocks(costly), dims=("y", "x"))
    with dask.config.set(scheduler="synchronous"):
        lsfov.save(xr.Dataset({"d": d, "clipped": d.clip(0, 1), "twice": d * 2}), tmp_path / "r.zarr")
    assert calls.count((550, 550)) == 4, calls  # each of the 4 blocks once, for three variables and their pyramids
    back = lsfov.open_result(tmp_path / "r.zarr")
    np.testing.assert_array_equal(back.twice.values, 2 * back.d.values)
    assert zarr.open_group(str(tmp_path / "r.zarr" / "clipped")).attrs["ome"]["multiscales"][0]["datasets"][1]


def test_save_never_harms_existing_output(tmp_path):
    path = tmp_path / "r.zarr"
    lsfov.save(_image(64, 64), path)
    before = sorted(os.listdir(path))
    computed = []

    def lazy(fn):
        return _image(64, 64).pipe(lambda a: a.copy(data=a.data.map_blocks(fn, meta=np.array((), np.float32))))

    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        lsfov.save(lazy(lambda b: computed.append(b.size) or b), path)
    assert sorted(os.listdir(path)) == before and not computed  # refused before any work
    # something that takes no lock writes the same path meanwhile: its files are kept, ours dropped
    theirs = tmp_path / "t.zarr"

    def meanwhile(b):
        theirs.mkdir(exist_ok=True)
        (theirs / "theirs.txt").write_text("someone's data")
        return b

    with pytest.raises(FileExistsError, match="appeared while this result was being written; nothing replaced"):
        lsfov.save(lazy(meanwhile), theirs)
    assert os.listdir(theirs) == ["theirs.txt"] and not list(tmp_path.glob(".t.zarr*"))
    shutil.rmtree(theirs)

    class Boom(Exception):
        pass

    def explode(block):
        raise Boom("worker died")

    bad = _image(64, 64).copy(data=da.from_array(np.ones((64, 64), np.float32), chunks=32).map_blocks(explode, dtype=np.float32))
    with pytest.raises(Boom):
        lsfov.save(bad, path, overwrite=True)
    # The old result is intact and no half-written result is left behind.
    assert lsfov.open_result(path).deblurred.shape == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]
    # A result whose completion marker is missing is refused.
    zarr.open_group(str(path), mode="a").attrs["lsfov"] = {"variables": ["deblurred"], "complete": False}
    with pytest.raises(ValueError, match="incomplete"):
        lsfov.open_result(path)
    with pytest.raises(ValueError, match="incomplete result"):  # nor is one of its variables
        lsfov.open_image(path / "deblurred")
    with pytest.raises(ValueError, match="r.zarr is an incomplete result .*; rerun it with --overwrite"):
        lsfov.open_image(path)  # (it advised opening a variable, which is refused)
    lsfov.save(_image(32, 32), path, overwrite=True)
    assert lsfov.open_result(path).deblurred.shape == (32, 32)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("someone's data")
    with pytest.raises(FileExistsError, match="not an lsfov result"):
        lsfov.save(_image(32, 32), tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").exists()
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: replaced
    lsfov.save(_image(32, 32), tmp_path / "empty", overwrite=True)
    assert lsfov.open_result(tmp_path / "empty").deblurred.shape == (32, 32)
    shutil.rmtree(tmp_path / "empty")
    # A write killed outright (SIGKILL) leaves its hidden temporary directory: the next write of the
    # same path removes it, and only its own (not those of other results beside it).
    for name in (".r.zarr.partial-0dead0", ".r.zarr.partial-1dead1", ".r.zarr2.partial-0live0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "zarr.json").write_text("{}")
    lsfov.save(_image(16, 16), path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.zarr2.partial-0live0", "precious", "r.zarr"]


def test_a_write_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    target, link = tmp_path / "store" / "t.zarr", tmp_path / "link.zarr"
    target.parent.mkdir()
    lsfov.save(_image(16, 16), target)
    link.symlink_to(target)
    lsfov.save(_image(32, 32), link, overwrite=True)
    assert link.is_symlink() and lsfov.open_result(target).deblurred.shape == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.zarr", "store"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.zarr"]
    dangling = tmp_path / "dangling.zarr"
    dangling.symlink_to(tmp_path / "store" / "new.zarr")  # a link made first, its target by the write
    lsfov.save(_image(16, 16), dangling)
    assert dangling.is_symlink() and lsfov.open_result(dangling).deblurred.shape == (16, 16)


def test_a_write_killed_between_its_two_renames_gives_the_old_result_back(tmp_path, caplog):
    """Replacing a result moves the old one aside, then the new one in: a write killed in between
    left neither at OUT. The next write of OUT puts the old one back first."""
    path = tmp_path / "r.zarr"
    lsfov.save(_image(16, 16), path)
    os.replace(path, tmp_path / ".r.zarr.old-0dead0")  # what the killed write had done
    (tmp_path / ".r.zarr.partial-0dead0").mkdir()  # and the new result it had finished
    with caplog.at_level("WARNING", logger="lsfov"), pytest.raises(FileExistsError, match="overwrite"):
        lsfov.save(_image(32, 32), path)
    assert "restoring" in caplog.text and lsfov.open_result(path).deblurred.shape == (16, 16)
    # A replacement that ended before removing the old result: that one is a leftover.
    (tmp_path / ".r.zarr.old-1dead1").mkdir()
    lsfov.save(_image(32, 32), path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]
    assert lsfov.open_result(path).deblurred.shape == (32, 32)
    # An old result whose removal was cut short is renamed first: never put back, only removed.
    shutil.copytree(path, tmp_path / ".r.zarr.removing-2dead2")
    shutil.rmtree(path)
    lsfov.save(_image(8, 8), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]
    assert lsfov.open_result(path).deblurred.shape == (8, 8)


def test_a_link_is_judged_by_what_it_names(tmp_path):
    (tmp_path / "x.tif").symlink_to(tmp_path / "nowhere.tif")  # a chain of links, to nothing yet
    (tmp_path / "r.zarr").symlink_to(tmp_path / "x.tif")
    with pytest.raises(ValueError, match="nowhere.tif: results are OME-Zarr directories; name it nowhere.zarr"):
        lsfov.save(_image(8, 8), tmp_path / "r.zarr")
    assert not (tmp_path / "nowhere.tif").exists()


def test_a_result_is_never_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for where in (".", ".."):
        with pytest.raises(ValueError, match="is the current folder"):
            lsfov.save(_image(16, 16), where, overwrite=True)
    assert os.listdir(tmp_path) == ["here"]


def test_metadata_holds_the_pixel_size_not_its_rounding_errors(tmp_path):
    """0.2 µm steps summed in floating point are 0.20000000000000004 apart: NGFF's scale says 0.2."""
    c = 0.2 * np.arange(40)
    img = xr.DataArray(np.ones((40, 40), np.float32), dims=("y", "x"),
                       coords={d: xr.Variable(d, c, {"units": "micrometer"}) for d in ("y", "x")})
    assert (c[29] - c[10]) / 19 != 0.2
    lsfov.save(img[10:30, 5:30], tmp_path / "crop.zarr")
    ms = json.loads((tmp_path / "crop.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"]
    assert ms[0]["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [0.2, 0.2]},
                                                                 {"type": "translation", "translation": [2.0, 1.0]}]
    # Far from 0 (a stage position), the coordinates' spacing is 0.2 too, not 0.19999999999998863
    stage = xr.DataArray(np.ones((4, 300), np.float32), dims=("y", "x"),
                         coords={d: xr.Variable(d, 1000 + 0.2 * np.arange(n), {"units": "µm"}) for d, n in (("y", 4), ("x", 300))})
    assert np.diff(stage.x.values)[0] != 0.2 and lsfov.io.pixel_size(stage) == 0.2


def test_save_bad_objects(tmp_path):
    with pytest.raises(TypeError, match="save"):
        lsfov.save("hello", tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="4-D"):
        lsfov.save(np.zeros((2, 2, 2, 2)), tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="empty|no variables"):
        lsfov.save(xr.Dataset(), tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="name it x.zarr"):  # a directory that would pass for a TIFF
        lsfov.save(np.ones((4, 4)), tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()
    for big in (np.full((20, 30), 1e39), da.from_array(np.pad([[-1e39]], ((0, 19), (0, 29))), chunks=10)):
        with pytest.raises(ValueError, match=r"variable 'image' has values beyond float32's range "
                                             r"\(\|x\| up to 1e\+39"):
            lsfov.save(big, tmp_path / "big.zarr")  # (halved to float32, it would be stored as Inf)
        assert not (tmp_path / "big.zarr").exists()
    lsfov.save(np.array([[1e30, np.nan, -np.inf]]), tmp_path / "ok.zarr")  # NaN and Inf stay what they are
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "ok.zarr").image.values,
                                  np.array([[1e30, np.nan, -np.inf]], np.float32))


def test_coordinates_in_other_length_units_are_written_in_micrometres(tmp_path):
    data = np.random.default_rng(3).random((6, 8)).astype(np.float32)
    img = xr.DataArray(data, dims=("y", "x"), coords={"y": xr.Variable("y", 500 + 100.0 * np.arange(6), {"units": "nm"}),
                                                     "x": xr.Variable("x", 100.0 * np.arange(8), {"units": "nm"})})
    lsfov.save(img.rename("image"), tmp_path / "nm.zarr")
    meta = json.loads((tmp_path / "nm.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]
    tr = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert tr[0]["scale"] == pytest.approx([0.1, 0.1]) and tr[1]["translation"] == pytest.approx([0.5, 0.0])
    back = lsfov.open_image(tmp_path / "nm.zarr" / "image")
    assert back.attrs["pixel_um"] == pytest.approx(0.1) and back.y.values[0] == pytest.approx(0.5)
    # a z axis too (its step and first plane)
    stack = img.expand_dims(z=3).assign_coords(z=xr.Variable("z", 2000 + 250.0 * np.arange(3), {"units": "nm"}))
    lsfov.save(stack.rename("image"), tmp_path / "z.zarr")
    meta = json.loads((tmp_path / "z.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]
    tr = meta["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    assert tr[0]["scale"] == pytest.approx([0.25, 0.1, 0.1]) and tr[1]["translation"] == pytest.approx([2.0, 0.5, 0.0])
    assert [a.get("unit") for a in meta["multiscales"][0]["axes"]] == ["micrometer"] * 3


@pytest.mark.parametrize("unit, um", [("angstrom", 1e-4), ("\u00c5", 1e-4), ("pm", 1e-6), ("micrometers", 1.0),
                                      ("\u00b5m", 1.0), ("nanometre", 1e-3), ("decimeter", 1e5), ("inches", 25400.0)])
def test_every_ngff_length_unit_is_read_and_written_in_micrometres(tmp_path, unit, um):
    """NGFF 0.5 names its space units as UCUM does (angstrom ... parsec): each is a length, in a
    coordinate to save as in an input's axes; an angstrom image came back labelled in pixels."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    img = xr.DataArray(np.zeros((4, 6), np.float32), dims=("y", "x"), name="image",
                       coords={d: (d, 5.0 * np.arange(n), {"units": unit}) for d, n in (("y", 4), ("x", 6))})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known unit: no warning
        lsfov.save(img, tmp_path / "a.zarr")
    back = lsfov.open_result(tmp_path / "a.zarr").image
    assert back.y.attrs["units"] == "micrometer" and back.attrs["pixel_um"] == pytest.approx(5 * um)
    if not unit.isascii() or unit.endswith("s") or unit == "nanometre":
        return  # (symbols and spellings NGFF does not use)
    root = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3)
    ngff = {"pm": "picometer"}.get(unit, unit)
    write_image(np.zeros((4, 6), np.uint16), root, axes="yx", fmt=FormatV05(), scale_factors=[],
                axes_units={"y": ngff, "x": ngff})  # (scale 1)
    assert lsfov.open_image(tmp_path / "other.zarr").attrs["pixel_um"] == pytest.approx(um)


def test_channel_names_and_the_pyramid_method_are_in_the_ngff_metadata(tmp_path):
    """Channel names as the omero labels NGFF readers (napari) name layers by; each multiscale says how
    its levels were made (NGFF: "type" and "metadata", which the strict schema requires)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    img = xr.DataArray(np.zeros((2, 60, 60), np.float32), dims=("c", "y", "x"), coords={"c": ["DAPI", "GFP"]})
    img[1, 10:20, 10:20] = 100.0
    lsfov.save(img, tmp_path / "c.zarr")
    (node,) = list(Reader(parse_url(str(tmp_path / "c.zarr" / "image")))())
    assert node.metadata["channel_names"] == ["DAPI", "GFP"]
    # A colour and a window per channel: with labels alone the reader gave napari no colormaps, and
    # napari refused the image ("the 'colormap' argument only provided 0 values")
    assert len(node.metadata["colormap"]) == 2 and node.metadata["colormap"][0] != node.metadata["colormap"][1]
    assert node.metadata["contrast_limits"] == [[0.0, 1.0], [0.0, 100.0]]  # (a flat channel: a range of 1)
    channels = json.loads((tmp_path / "c.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]["omero"]
    assert all({"label", "color", "window", "active"} <= set(c) for c in channels["channels"])
    ms = json.loads((tmp_path / "c.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert ms["type"] == "local_mean" and ms["metadata"]["method"] == "lsfov.io._halved"
    assert list(lsfov.open_result(tmp_path / "c.zarr").image.c.values) == ["DAPI", "GFP"]
    # A chosen channel says its name, which what is made of it keeps (README: as .sel(c=...) would)
    gfp = lsfov.open_image(tmp_path / "c.zarr", channel=1)
    assert gfp.attrs["plane"] == {"c": 1} and gfp.attrs["channel"] == "GFP" and gfp.dims == ("y", "x")
    assert lsfov.io.plane_of(gfp) == {"plane": {"c": 1}, "channel": "GFP"}
    assert {p.attrs["channel"] for p in lsfov.io.open_planes(tmp_path / "c.zarr", channel=-1)} == {"GFP"}
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "unnamed.zarr"), mode="w", zarr_format=3)
    write_image(np.zeros((2, 8, 8), np.uint16), root, axes="cyx", fmt=FormatV05(), scale_factors=[])
    root.attrs["ome"] = {**root.attrs["ome"], "omero": {"channels": [{"color": "FF0000"}, {"color": "00FF00"}]}}
    # (not the reader's made-up names)
    assert "channel" not in lsfov.open_image(tmp_path / "unnamed.zarr", channel=1).attrs
    assert "channel" not in lsfov.io.open_planes(tmp_path / "unnamed.zarr", channel=1)[0].attrs
    lsfov.save(img.isel(c=0, drop=True), tmp_path / "one.zarr")  # no channels: no omero block
    assert "omero" not in json.loads((tmp_path / "one.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]


def test_a_coordinate_in_an_unknown_unit_is_saved_in_pixels_with_a_warning(tmp_path):
    img = xr.DataArray(np.zeros((4, 6), np.float32), dims=("y", "x"), name="image",
                       coords={d: (d, 5.0 * np.arange(n), {"units": "furlong"}) for d, n in (("y", 4), ("x", 6))})
    with pytest.warns(lsfov.LsfovWarning, match="'furlong', which lsfov does not know as a length: they are saved in "
                                                "pixels") as said:
        lsfov.save(img, tmp_path / "f.zarr")
    assert len(said) == 2  # y and x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pixels are no news
        lsfov.save(img.assign_coords(y=("y", np.arange(4.0), {"units": "px"}), x=("x", np.arange(6.0),
                                                                                 {"units": "pixel"})), tmp_path / "p.zarr")


def test_multiscale_level_transforms_apply_after_the_dataset_ones(tmp_path):
    """NGFF: a multiscale may carry its own scale and translation, applied after each dataset's."""
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "top.zarr"), mode="w", zarr_format=3)
    write_image(np.zeros((4, 6), np.uint16), root, axes="yx", fmt=FormatV05(), scale_factors=[],
                axes_units={"y": "micrometer", "x": "micrometer"})
    ome = dict(root.attrs["ome"])
    ms = [dict(ome["multiscales"][0])]
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [0.5, 0.25]},
                                          {"type": "translation", "translation": [10.0, 20.0]}]
    root.attrs["ome"] = {**ome, "multiscales": ms}
    arr = lsfov.open_image(tmp_path / "top.zarr")
    assert arr.attrs["pixel_um"] is None  # 0.5 x 0.25 µm pixels: not square, no one size (see the test below)
    np.testing.assert_allclose(arr.x.values, 20 + 0.25 * np.arange(6))
    np.testing.assert_allclose(arr.y.values, 10 + 0.5 * np.arange(4))


def test_tiffs_zarr_cannot_wrap_are_memory_mapped_or_read_whole(tmp_path, monkeypatch, count_calls):
    """Where tifffile's zarr view fails, an uncompressed file is memory-mapped, any other read whole,
    with the same pixels, axes and pixel size."""
    stack = np.random.default_rng(0).integers(0, 4000, (3, 40, 48)).astype(np.uint16)
    meta = {"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2}
    tifffile.imwrite(tmp_path / "raw.ome.tif", stack, metadata=meta)
    tifffile.imwrite(tmp_path / "zip.ome.tif", stack, metadata=meta, compression="zlib")

    def fails(*a, **k):
        raise ValueError("a layout zarr cannot wrap")

    monkeypatch.setattr(lsfov.io, "_tiff_dask", fails)
    mapped, read = count_calls(tifffile, "memmap"), count_calls(tifffile, "imread")
    for name, used in (("raw", mapped), ("zip", read)):
        arr = lsfov.open_image(tmp_path / f"{name}.ome.tif", z=1)
        assert len(used) == 1 and arr.dims == ("y", "x") and arr.attrs["pixel_um"] == pytest.approx(0.2)
        np.testing.assert_array_equal(arr.values, stack[1])
    assert len(read) == 1  # the raw file did not need it


def test_a_write_whose_task_fails_leaves_nothing_behind(tmp_path):
    """On the threaded scheduler, tasks still running when another fails end before the error is
    raised: one still writing a chunk made the removed temporary directory again."""
    import time

    def block(b, block_info=None):
        if block_info[0]["chunk-location"] == (0, 0):
            raise RuntimeError("a task failed")
        time.sleep(0.3)  # still running when the error arrives
        return b

    import threading

    failed = []

    def write(name):
        try:
            lsfov.save(img, tmp_path / name)
        except RuntimeError as e:
            failed.append(str(e))

    with dask.config.set(scheduler="threads", num_workers=2):
        img = da.from_array(np.ones((512, 512), np.float32), chunks=256).map_blocks(block, dtype=np.float32)
        with pytest.raises(RuntimeError, match="a task failed"):
            lsfov.save(img, tmp_path / "r.zarr")
        other = threading.Thread(target=write, args=("t.zarr",))  # another thread (a viewer's worker)
        other.start()
        other.join()
    assert failed == ["a task failed"]
    time.sleep(0.6)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_threaded_computes_reuse_their_pool_and_nest(monkeypatch):
    """lsfov's pools: one per calling thread and size, kept (per-thread GPU plans survive), holding
    no finished work, honouring num_workers; a compute inside a task gets a pool of its own (the
    caller's, all busy, would deadlock); other schedulers are left as they are."""
    import concurrent.futures
    import threading
    import time

    from lsfov import cluster

    seen = set()

    def where(b):
        seen.add(threading.get_ident())
        time.sleep(0.05)
        return b

    x = da.ones((6, 6), chunks=1).map_blocks(where, meta=np.empty((0, 0)))  # (no call here to find its meta)
    with dask.config.set(scheduler="threads", num_workers=3):
        assert cluster.compute(x.sum()) == 36 and len(seen) == 3
        pool = cluster._settling_pool(3)
        assert pool is cluster._settling_pool(3) and not pool._live
        first = set(seen)
        cluster.compute(x.sum())
        assert seen == first  # the same threads again
        inner = da.ones(4, chunks=1)
        nested = da.ones(3, chunks=1).map_blocks(lambda b: b * cluster.compute(inner.sum()), meta=np.empty(0))
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            assert ex.submit(cluster.compute, nested.sum()).result(timeout=30) == 12
    with dask.config.set(scheduler="synchronous"):
        seen.clear()
        cluster.compute(x.sum())
        assert seen == {threading.get_ident()}


def test_an_interrupted_compute_stops_its_running_tasks_at_their_next_iteration():
    """Ctrl-C or SIGTERM (not an Exception) in the thread that waits: tasks still running end at
    their next ``stop_point`` (a TV-RL or BSS iteration), since Python waits for their threads at exit
    and a batch job has seconds of grace; queued tasks are dropped, and the next compute runs. A
    compute inside a task stops with the compute that runs the task."""
    import threading
    import time

    from lsfov import cluster

    ended = []

    def long(b, first):  # an iterative block task: 30 s if nothing stops it
        t0 = time.perf_counter()
        try:
            if first():  # the interrupt, reaching the waiting thread (as a task's KeyboardInterrupt does)
                raise KeyboardInterrupt
            for _ in range(3000):
                cluster.stop_point()
                time.sleep(0.01)
        finally:
            ended.append(time.perf_counter() - t0)
        return b

    def short(b):
        for _ in range(3):
            cluster.stop_point()
        return b

    with dask.config.set(scheduler="threads", num_workers=2):
        pool = cluster._settling_pool(2)
        both = threading.Barrier(2)
        with pytest.raises(KeyboardInterrupt):  # once both run, one is interrupted
            cluster.compute([dask.delayed(long)(i, lambda: both.wait(10) == 0) for i in range(6)])
        pool.shutdown(wait=True)  # as Python's exit does: its threads end within an iteration
        assert len(ended) == 2 and max(ended) < 5, ended  # the two running, stopped; the queued, dropped
        assert cluster._settling_pool(2) is not pool
        assert cluster.compute([dask.delayed(short)(i) for i in range(4)]) == [0, 1, 2, 3]  # a new pool
        # The compute running a task is stopped (here by hand): the compute inside that task stops too
        ended.clear()
        outer = cluster._settling_pool(2)
        inner_both = threading.Barrier(2)

        def stop_outer():
            if inner_both.wait(10) == 0:
                outer.stop()
            return False

        inner = lambda b: cluster.compute([dask.delayed(long)(i, stop_outer) for i in range(2)])  # noqa: E731
        with pytest.raises(cluster._Stopped):
            cluster.compute(dask.delayed(inner)(0))
        outer.shutdown(wait=True)
        assert len(ended) == 2 and max(ended) < 5, ended
        # A stopped pool is never handed out again (a second signal while it was being retired)
        pool = cluster._settling_pool(2)
        pool._stop.set()
        assert cluster._settling_pool(2) is not pool
    cluster.stop_point()  # outside a task: nothing to stop


def test_the_long_loops_are_stop_points():
    """TV-RL and BSS iterations and the CNN's passes end in a task whose compute was interrupted."""
    import threading

    from lsfov import cluster

    y = np.random.default_rng(1).uniform(1, 2, (64, 64)).astype(np.float32)
    g = np.exp(-np.arange(-3, 4) ** 2 / 2)
    op = lsfov.ProductConvolution.from_psf(np.outer(g, g) / np.outer(g, g).sum(), y.shape)
    patches = np.random.default_rng(0).random((3, 128, 128)).astype(np.float32)
    work = {"TV-RL": lambda: lsfov.deconvolve(y, op, iterations=3),
            "BSS": lambda: lsfov.sparse_smooth_deblur(y, op, iterations=3),
            "CNN": lambda: lsfov.load_model("G1").predict(patches, batch_size=1),
            "CNN, its fixed passes": lambda: lsfov.load_model("G1").predict(patches, batch_size=1, reproducible=True)}
    stop = threading.Event()
    cluster._task.stops = (stop,)  # this thread as a task of lsfov's pool
    try:
        for what, run in work.items():
            run()  # not stopped: runs
            stop.set()
            with pytest.raises(cluster._Stopped):
                run()
            stop.clear()
    finally:
        del cluster._task.stops


def test_dates_and_durations_on_the_time_axis_are_saved_and_read_back(tmp_path):
    """A time-lapse labelled with the dates its frames were taken at (as xarray and pandas make them),
    or with durations: saved (they failed after every pixel was written), NGFF's time axis in seconds
    from the first frame, and read back as dates and durations, exactly."""
    planes = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    when = np.array(["2024-05-01T10:00:00", "2024-05-01T10:00:30", "2024-05-01T10:01:00.000001"], "datetime64[us]")
    for t in (when, when - when[0]):
        series = xr.DataArray(planes, dims=("t", "y", "x"), coords={"t": t, "started": when[0]})
        out = lsfov.save(series, tmp_path / f"{t.dtype.kind}.zarr")
        back = lsfov.open_result(out).image
        np.testing.assert_array_equal(back.t.values, t)
        assert back.started.values == when[0] and back.t.dtype == t.dtype
        m = json.loads((out / "image" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
        assert m["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
        assert m["datasets"][0]["coordinateTransformations"][0]["scale"][0] == pytest.approx(30.0)
        np.testing.assert_array_equal(back.values, planes)


def test_an_unnamed_dask_image_is_saved_as_image_and_lost_coordinates_are_said(tmp_path):
    """xarray names a DataArray of a Dask array after the array's key: saved as ``image`` (as an
    unnamed NumPy one), not under that random key. A coordinate of a dim that is not its own is not
    kept by OME-Zarr: said, not dropped in silence."""
    lsfov.save(xr.DataArray(da.ones((32, 32), chunks=16), dims=("y", "x")), tmp_path / "u.zarr")
    assert list(lsfov.open_result(tmp_path / "u.zarr")) == ["image"]
    assert lsfov.open_image(tmp_path / "u.zarr").shape == (32, 32)
    labelled = xr.DataArray(np.ones((8, 8), np.float32), dims=("y", "x"), coords={"row": ("y", np.arange(8))})
    with pytest.warns(lsfov.LsfovWarning, match="row of .image. are not saved"):
        lsfov.save(labelled, tmp_path / "l.zarr")
    flipped = xr.DataArray(np.ones((8, 8), np.float32), dims=("y", "x"), coords={"y": -0.1 * np.arange(8)})
    with pytest.raises(ValueError, match=r"flip it \(.isel\(y=slice\(None, None, -1\)\)\)"):
        lsfov.save(flipped, tmp_path / "f.zarr")
    assert not (tmp_path / "f.zarr").exists()


def test_info_says_which_chunks_are_not_stored(tmp_path):
    """A zarr chunk that is not stored reads as the fill value: a copy cut short looks whole. lsfov
    stores every chunk of what it writes (an all-False mask too), and info says what is missing."""
    ds = xr.Dataset({"image": (("y", "x"), np.ones((256, 256), np.float32)),
                     "mask": (("y", "x"), np.zeros((256, 256), bool))})
    out = lsfov.save(ds, tmp_path / "r.zarr", chunks=128)
    assert "not stored" not in lsfov.io.describe(out)
    (out / "image" / "0" / "c" / "1" / "0").unlink()
    said = lsfov.io.describe(out)
    assert "1 of 4 chunks not stored: they read as 0.0" in said and said.count("not stored") == 1, said
    assert "1 of 4 chunks not stored" in lsfov.io.describe(out / "image")
    np.testing.assert_array_equal(lsfov.open_result(out).image.values[128:, :128], 0)  # (what a reader sees)


def test_a_time_series_is_written_with_its_interval_and_read_back_per_time_point(tmp_path):
    """NGFF: a t axis of type time, its interval as scale and its start as translation, in UCUM's
    words; the reader gives the coordinates back and a time point says when it was taken."""
    series = xr.DataArray(np.random.default_rng(0).random((4, 16, 16)).astype(np.float32), dims=("t", "y", "x"),
                          coords={"t": ("t", 30.0 + 2.5 * np.arange(4), {"units": "s"})})
    lsfov.save(series, tmp_path / "ts.zarr")
    m = json.loads((tmp_path / "ts.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert m["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    scale, trans = (tr[k] for tr, k in zip(m["datasets"][0]["coordinateTransformations"], ("scale", "translation")))
    assert scale[0] == pytest.approx(2.5) and trans[0] == pytest.approx(30.0)
    back = lsfov.open_result(tmp_path / "ts.zarr").image
    np.testing.assert_allclose(back.t.values, 30.0 + 2.5 * np.arange(4))
    assert back.t.attrs["units"] == "s"  # as saved (the NGFF metadata says "second")
    one = lsfov.open_image(tmp_path / "ts.zarr" / "image", t=2)
    assert one.shape == (16, 16) and (one.attrs["t"], one.attrs["t_units"]) == (pytest.approx(35.0), "second")
    # Every NGFF time unit, by its name, plural or symbol; xarray's usual "time" is a t axis too (it was a channel)
    for unit, ngff in (("µs", "microsecond"), ("microseconds", "microsecond"), ("ns", "nanosecond"), ("day", "day"),
                       ("minutes", "minute"), ("hours", "hour"), ("milliseconds", "millisecond")):
        lsfov.save(series.assign_coords(t=("t", series.t.values, {"units": unit})), tmp_path / "u.zarr", overwrite=True)
        axis = json.loads((tmp_path / "u.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]
        assert axis["multiscales"][0]["axes"][0] == {"name": "t", "type": "time", "unit": ngff}, unit
    lsfov.save(series.rename(t="time"), tmp_path / "time.zarr")
    m = json.loads((tmp_path / "time.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert m["axes"][0] == {"name": "t", "type": "time", "unit": "second"}
    assert m["datasets"][0]["coordinateTransformations"][0]["scale"][0] == pytest.approx(2.5)
    back = lsfov.open_result(tmp_path / "time.zarr").image
    assert back.dims == ("time", "y", "x") and back.time.values[1] == pytest.approx(32.5)
    np.testing.assert_array_equal(one.values, series.values[2])
    # Unevenly spaced or without a unit: no time geometry is made up (scale 1, no unit).
    with pytest.warns(lsfov.LsfovWarning, match="the t coordinate of 'image' is not evenly spaced"):
        lsfov.save(series.assign_coords(t=("t", [0.0, 1.0, 3.0, 4.0], {"units": "s"})), tmp_path / "odd.zarr")
    odd = json.loads((tmp_path / "odd.zarr" / "image" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert odd["axes"][0] == {"name": "t", "type": "time"}
    assert odd["datasets"][0]["coordinateTransformations"][0]["scale"][0] == 1.0


def test_a_maps_axis_is_averaged_on_its_circle_in_the_pyramid(tmp_path):
    """Axes of 0.05 and π - 0.05 rad are nearly the same orientation: their pyramid level is near 0
    (mod π), not their arithmetic mean π/2, the perpendicular a viewer would show; Z2's axis repeats
    every π/2. Other variables keep the plain mean."""
    n = 1024
    checker = (np.indices((n, n)).sum(0) % 2).astype(bool)
    for model, period in (("Z3", np.pi), ("Z2", np.pi / 2)):
        axis = np.where(checker, 0.05, period - 0.05).astype(np.float32)
        other = np.where(checker, 0.05, period - 0.05).astype(np.float32)
        ds = xr.Dataset({"axis": (("gy", "gx"), axis, {"units": "radian"}), "astigmatism": (("gy", "gx"), other)},
                        attrs={"psf_model": model})
        lsfov.save(ds, tmp_path / f"{model}.zarr")
        level = zarr.open_array(str(tmp_path / f"{model}.zarr" / "axis" / "1"))[...]
        assert level.shape == (n // 2, n // 2)
        np.testing.assert_allclose(np.minimum(level, period - level), 0, atol=1e-6)  # 0 on the circle
        np.testing.assert_allclose(zarr.open_array(str(tmp_path / f"{model}.zarr" / "astigmatism" / "1"))[...],
                                   period / 2, rtol=1e-6)
    # An area of one orientation keeps its value at every level, in the model's own range: Z2's axis
    # spans (0, π) with a period of π/2, and a Z3 axis just under π is not written as just over 0
    for model, value in (("Z2", 2.8), ("Z3", np.float32(np.pi) - 1e-6)):
        ds = xr.Dataset({"axis": (("gy", "gx"), np.full((n, n), value, np.float32))}, attrs={"psf_model": model})
        lsfov.save(ds, tmp_path / "one.zarr", overwrite=True)
        np.testing.assert_allclose(zarr.open_array(str(tmp_path / "one.zarr" / "axis" / "1"))[...], value, rtol=1e-6)
    # A block whose mean on the circle lies just below 0 (or just above π) is written inside (0, π)
    for first, other in ((0.01, np.pi - 0.05), (np.pi - 0.01, 0.05)):
        block = np.full((n, n), first, np.float32)
        block[1::2, 1::2] = other
        ds = xr.Dataset({"axis": (("gy", "gx"), block)}, attrs={"psf_model": "Z3"})
        lsfov.save(ds, tmp_path / "mixed.zarr", overwrite=True)
        level = zarr.open_array(str(tmp_path / "mixed.zarr" / "axis" / "1"))[...]
        assert ((level >= 0) & (level < np.pi)).all(), (level.min(), level.max())
        np.testing.assert_allclose(np.minimum(level, np.pi - level), 0.005, atol=1e-4)
    # The true field of `simulate blur` names its model on each variable
    axis = np.where(checker, 0.05, np.pi - 0.05).astype(np.float32)
    lsfov.save(xr.Dataset({"axis": (("gy", "gx"), axis, {"units": "radian", "psf_model": "Z3"})}), tmp_path / "t.zarr")
    level = zarr.open_array(str(tmp_path / "t.zarr" / "axis" / "1"))[...]
    np.testing.assert_allclose(np.minimum(level, np.pi - level), 0, atol=1e-6)


def test_stacks_transposes_odd_attributes_and_integer_pyramids_are_written_as_ngff_says(tmp_path):
    """A z-stack keeps its z step and unit (NGFF: a scale for every axis) and is chunked a plane at a
    time; an (x, y) image is written as y, x (the axes are named by position); NaN attributes are
    null, not JSON's missing NaN; an integer pyramid level is the rounded 2x2 mean, a mask's a majority."""
    um = {"units": "micrometer"}
    stack = xr.DataArray(np.random.default_rng(0).random((3, 20, 24)).astype(np.float32), dims=("z", "y", "x"),
                         coords={"z": ("z", [1.0, 1.5, 2.0], um), "y": ("y", 0.2 * np.arange(20), um),
                                 "x": ("x", 0.2 * np.arange(24), um)})
    flat = xr.DataArray(np.arange(24 * 20, dtype=np.float32).reshape(24, 20), dims=("x", "y"),
                        coords={"x": ("x", 0.5 * np.arange(24), um), "y": ("y", 0.2 * np.arange(20), um)})
    rng = np.random.default_rng(1)
    counts = xr.DataArray(rng.integers(0, 255, (1024, 1024)).astype(np.uint8), dims=("y", "x"))
    mask = xr.DataArray(rng.random((1024, 1024)) < 0.3, dims=("y", "x"))
    lsfov.save(xr.Dataset({"stack": stack}), tmp_path / "r.zarr")
    lsfov.save(xr.Dataset({"flat": flat.assign_attrs(odd=np.float32("nan"))},
                          attrs={"bad": float("nan"), "nested": {"x": [1.0, float("inf")]}}), tmp_path / "t.zarr")
    lsfov.save(xr.Dataset({"counts": counts, "mask": mask}), tmp_path / "p.zarr")

    def ome(path):
        return json.loads((tmp_path / path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]

    z = ome("r.zarr/stack")
    assert z["axes"][0] == {"name": "z", "type": "space", "unit": "micrometer"}
    scale, trans = (t[k] for t, k in zip(z["datasets"][0]["coordinateTransformations"], ("scale", "translation")))
    assert scale == pytest.approx([0.5, 0.2, 0.2]) and trans[0] == pytest.approx(1.0)
    assert json.loads((tmp_path / "r.zarr" / "stack" / "0" / "zarr.json").read_text())["chunk_grid"][
        "configuration"]["chunk_shape"][0] == 1
    back = lsfov.open_result(tmp_path / "r.zarr")
    np.testing.assert_allclose(back["stack"].z.values, [1.0, 1.5, 2.0])
    assert back["stack"].z.attrs["units"] == "micrometer"
    f = ome("t.zarr/flat")
    assert [a["name"] for a in f["axes"]] == ["y", "x"]
    assert f["datasets"][0]["coordinateTransformations"][0]["scale"] == pytest.approx([0.2, 0.5])
    back = lsfov.open_result(tmp_path / "t.zarr")
    np.testing.assert_array_equal(back.flat.transpose("x", "y").values, flat.values)
    for path in (tmp_path / "t.zarr" / "zarr.json", tmp_path / "t.zarr" / "flat" / "zarr.json"):
        json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path}"))  # strict JSON
    assert back.attrs["bad"] is None and back.attrs["nested"] == {"x": [1.0, None]} and back.flat.attrs["odd"] is None
    # float16 (as float64) stored as float32, what every viewer reads
    lsfov.save(xr.DataArray(np.ones((8, 10), np.float16), dims=("y", "x"), name="half"), tmp_path / "half.zarr")
    assert zarr.open_array(str(tmp_path / "half.zarr" / "half" / "0")).dtype == np.float32
    # a 0-D coordinate (.sel(c=2) keeps it: which plane this is) comes back as saved
    chans = xr.DataArray(np.ones((3, 8, 10), np.float32), dims=("c", "y", "x"),
                         coords={"c": [0, 1, 2], "wavelength": ("c", [488.0, 561.0, 640.0], {"units": "nm"})})
    lsfov.save(chans.sel(c=2).rename("red"), tmp_path / "red.zarr")
    red = lsfov.open_result(tmp_path / "red.zarr").red
    assert red.coords["c"].item() == 2 and red.coords["wavelength"].item() == 640.0
    assert red.coords["wavelength"].attrs == {"units": "nm"} and red.dims == ("y", "x")
    # µm coordinates written without a unit (spaced at the stated pixel size) or as "μm": µm in the file
    img = np.zeros((8, 10), np.float32)
    for name, coords, attrs in (
            ("bare", {"y": 100 + 0.2 * np.arange(8), "x": 50 + 0.2 * np.arange(10)}, {"pixel_um": 0.2}),
            ("greek", {"y": ("y", 100 + 0.2 * np.arange(8), {"units": "\u03bcm"}),
                       "x": ("x", 50 + 0.2 * np.arange(10), {"units": "\u03bcm"})}, {})):
        lsfov.save(xr.DataArray(img, dims=("y", "x"), coords=coords, attrs=attrs, name="image"), tmp_path / f"{name}.zarr")
        ms = ome(f"{name}.zarr/image")
        assert [a.get("unit") for a in ms["axes"]] == ["micrometer"] * 2, name
        assert ms["datasets"][0]["coordinateTransformations"][1]["translation"] == pytest.approx([100, 50])
        back = lsfov.open_image(tmp_path / f"{name}.zarr" / "image")
        assert back.attrs["pixel_um"] == pytest.approx(0.2) and back.y.attrs["units"] == "micrometer"
    level1 = np.asarray(zarr.open_array(str(tmp_path / "p.zarr" / "counts" / "1"), mode="r"))
    want = counts.values.reshape(512, 2, 512, 2).mean(axis=(1, 3))
    np.testing.assert_array_equal(level1, np.rint(want).astype(np.uint8))
    level1 = np.asarray(zarr.open_array(str(tmp_path / "p.zarr" / "mask" / "1"), mode="r"))
    np.testing.assert_array_equal(level1, mask.values.reshape(512, 2, 512, 2).mean(axis=(1, 3)) >= 0.5)
    # A mask is 0/1 uint8 in the file (any viewer reads it), a mask again in lsfov (~mask is its complement)
    assert level1.dtype == np.uint8 and zarr.open_array(str(tmp_path / "p.zarr" / "mask" / "0")).dtype == np.uint8
    back = lsfov.open_result(tmp_path / "p.zarr")
    assert back.mask.dtype == bool and back.counts.dtype == np.uint8
    np.testing.assert_array_equal(back.mask.values, mask.values)


def test_stores_opened_by_a_relative_path_read_right_from_another_directory(tmp_path, monkeypatch):
    """Lazy reads run where the workers are, and a batch system starts them in another directory:
    a relative path once read every chunk as zarr's fill value, 0, without an error."""
    monkeypatch.chdir(tmp_path)
    img = _image(64, 48)
    lsfov.save(img, "r.zarr")
    k = np.stack([lsfov.psf.gaussian(s, size=9) for s in (1.0, 2.0)])
    maps = np.stack([np.linspace(0, 1, 64 * 48).reshape(64, 48)] * 2).astype(np.float32)
    maps[1] = 1 - maps[0]
    lsfov.ProductConvolution.from_basis(k, maps).save("op.zarr")
    res, op = lsfov.open_result("r.zarr"), lsfov.ProductConvolution.load("op.zarr")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    np.testing.assert_array_equal(res["deblurred"].values, img.values)
    u = np.ones((64, 48), np.float32)
    np.testing.assert_allclose(op.apply(u), lsfov.ProductConvolution.from_basis(k, maps).apply(u), rtol=1e-6)


def test_a_stale_pixel_size_attribute_gives_way_to_the_coordinates():
    """``isel`` steps and ``coarsen`` change the coordinates, not ``attrs["pixel_um"]``: the map of
    such an image once put its nodes at half their distance, and no pixel-size check saw it."""
    img = lsfov.io.with_pixel_size(np.ones((256, 256), np.float32), 0.2)
    sub = img.isel(y=slice(0, None, 2), x=slice(0, None, 2))
    with pytest.warns(lsfov.LsfovWarning, match=r"pixel_um attribute \(0.2 µm\) is not its coordinates' spacing "
                                                r"\(0.4 µm"):
        assert lsfov.io.pixel_size(sub) == pytest.approx(0.4)
    assert lsfov.io.pixel_size(img) == 0.2 and lsfov.io.pixel_size(img.assign_attrs(pixel_um=0.201)) == 0.201
    # Only y in µm (x in pixels): its spacing is the one known; 1 % off is rounding, 5 % is not.
    yonly = img.assign_coords(x=("x", np.arange(256.0), {"units": "pixel"})).isel(y=slice(0, None, 2))
    with pytest.warns(lsfov.LsfovWarning, match="the coordinates' is used"):
        assert lsfov.io.pixel_size(yonly) == pytest.approx(0.4)
    with pytest.warns(lsfov.LsfovWarning, match=r"\(0.21 µm"):
        lsfov.io.pixel_size(img.assign_attrs(pixel_um=0.21))
    # One axis subsampled: the attribute holds for y alone, the pixels are no longer square.
    with pytest.raises(ValueError, match=r"not square \(y 0.2 µm, x 0.4 µm\)"):
        lsfov.io.pixel_size(img.isel(x=slice(0, None, 2)))


def test_an_image_subsampled_along_one_axis_is_saved_with_each_axis_scale(tmp_path):
    img = lsfov.io.with_pixel_size(np.ones((64, 64), np.float32), 0.2).isel(x=slice(0, None, 2))
    lsfov.save(img.rename("image"), tmp_path / "r.zarr")
    back = lsfov.open_result(tmp_path / "r.zarr")["image"]
    assert back.attrs["pixel_um"] is None
    np.testing.assert_allclose(np.diff(back.x.values), 0.4)
    np.testing.assert_allclose(np.diff(back.y.values), 0.2)
    # Coordinates without a unit say as much: their ratio needs none, and both axes share their unit.
    bare = xr.DataArray(np.ones((64, 64), np.float32), dims=("y", "x"), name="image", attrs={"pixel_um": 0.2},
                        coords={"y": 0.2 * np.arange(64), "x": 0.2 * np.arange(64)}).isel(x=slice(0, None, 2))
    with pytest.raises(ValueError, match=r"not square \(y 0.2, x 0.4, no unit\)"):
        lsfov.io.pixel_size(bare)
    with pytest.raises(ValueError, match=r"not square \(y 1 pixel, x 2 pixel\)"):  # in the original's pixels
        lsfov.io.pixel_size(bare.assign_coords(y=("y", np.arange(64.0), {"units": "pixel"}),
                                               x=("x", np.arange(0.0, 64, 2), {"units": "pixel"})))
    lsfov.save(bare, tmp_path / "bare.zarr")  # both axes in µm (y's spacing is the pixel size), as above
    back = lsfov.open_result(tmp_path / "bare.zarr")["image"]
    assert back.x.attrs["units"] == back.y.attrs["units"] == "micrometer" and back.attrs["pixel_um"] is None
    np.testing.assert_allclose(np.diff(back.x.values), 0.4)
    # ... and unitless pixel indices (a step of one) count pixels of the size the attribute says, as
    # image_origin reads them: in µm, where a map of the image lies (they were saved in pixels)
    lsfov.save(bare.assign_coords(y=np.arange(64.0), x=np.arange(5.0, 37.0)), tmp_path / "idx.zarr")
    back = lsfov.open_result(tmp_path / "idx.zarr")["image"]
    assert back.x.attrs["units"] == back.y.attrs["units"] == "micrometer" and back.attrs["pixel_um"] == 0.2
    np.testing.assert_allclose(back.x.values[[0, -1]], [1.0, 7.2])
    # unitless coordinates of another step say nothing of pixels: both axes saved as they are
    lsfov.save(bare.assign_coords(y=np.arange(64.0), x=np.arange(0.0, 96.0, 3.0)), tmp_path / "odd.zarr")
    back = lsfov.open_result(tmp_path / "odd.zarr")["image"]
    assert back.x.attrs["units"] == back.y.attrs["units"] == "pixel"


def test_a_stale_pixel_size_is_saved_as_the_coordinates_say(tmp_path):
    import warnings

    sub = lsfov.io.with_pixel_size(np.ones((64, 64), np.float32), 0.2).isel(y=slice(0, None, 2), x=slice(0, None, 2))
    with pytest.warns(lsfov.LsfovWarning, match="the coordinates' is used"):
        lsfov.save(sub.rename("image"), tmp_path / "r.zarr")
    back = lsfov.open_result(tmp_path / "r.zarr")["image"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read back, it no longer contradicts itself
        assert back.attrs["pixel_um"] == pytest.approx(0.4) and lsfov.io.pixel_size(back) == pytest.approx(0.4)


def test_a_result_is_never_written_inside_another_zarr_store(tmp_path, run):
    """OUT naming a variable (or an array) of an existing result, with --overwrite, replaced it by a
    whole result: the outer result, and the variable in a viewer, no longer opened."""
    img = xr.DataArray(np.ones((16, 16), np.float32), dims=("y", "x"))
    lsfov.save(xr.Dataset({"a": img, "b": img}), tmp_path / "r.zarr")
    for inner in ("r.zarr/a", "r.zarr/a/0", "r.zarr/new"):
        with pytest.raises(ValueError, match=f"{inner} is inside the zarr store .*r.zarr; a result is a store of its own"):
            lsfov.save(xr.Dataset({"a": img}), tmp_path / inner, overwrite=True)
    np.save(tmp_path / "i.npy", np.ones((32, 32), np.float32))
    np.save(tmp_path / "p.npy", np.ones((3, 3), np.float32))
    res = run("deconvolve", "i.npy", "r.zarr/b", "--psf", "p.npy", "--overwrite", ok=False)
    assert res.exit_code == 1 and "r.zarr/b is inside the zarr store" in res.output, res.output
    np.testing.assert_array_equal(lsfov.open_result(tmp_path / "r.zarr")["b"], img)  # untouched


def test_a_z_or_t_axis_ngff_cannot_scale_is_said(tmp_path):
    """Unevenly spaced or descending z (or t) planes: NGFF's scale cannot hold them and viewers show
    them one unit apart; lsfov reads them back from its own copy, and says so."""
    b = np.ones((3, 8, 8), np.float32)
    for z, hint in (([0, 0.5, 1.5], "resample it"), ([1.5, 0.5, 0], r"flip it \(.isel\(z=slice")):
        var = xr.DataArray(b, dims=("z", "y", "x"), coords={"z": xr.Variable("z", z, {"units": "um"})})
        with pytest.warns(lsfov.LsfovWarning, match=f"the z coordinate of 'v' is not evenly spaced .*{hint}"):
            lsfov.save(xr.Dataset({"v": var}), tmp_path / f"z{z[0]}.zarr")
        np.testing.assert_array_equal(lsfov.open_result(tmp_path / f"z{z[0]}.zarr")["v"].z, z)
    even = xr.DataArray(b, dims=("z", "y", "x"), coords={"z": xr.Variable("z", [0, 0.5, 1.0], {"units": "um"})})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lsfov.save(xr.Dataset({"v": even}), tmp_path / "even.zarr")


def test_a_file_named_npy_that_is_not_one_is_said_to_be(tmp_path):
    (tmp_path / "notes.npy").write_text("1 2 3\n4 5 6\n")
    with pytest.raises(ValueError, match=r"notes.npy is not a NumPy .npy file \(numpy.save writes one\)") as e:
        lsfov.open_image(tmp_path / "notes.npy")
    assert "pickle" not in str(e.value)  # NumPy's own message steered to unsafe loading
    np.save(tmp_path / "stack.npy", np.ones((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"z=5 \(--z\) out of range; the image has 2 along z"):
        lsfov.open_image(tmp_path / "stack.npy", z=5)


def test_an_image_without_coordinates_is_saved_at_its_pixel_size(tmp_path):
    """An xarray image that has a ``pixel_um`` but no coordinates (as made by hand) opens in a viewer
    at that size in µm, not in pixels; a map's node axes are not pixels apart and stay unscaled."""
    img = xr.DataArray(np.ones((8, 8), np.float32), dims=("y", "x"), attrs={"pixel_um": 0.2})
    nodes = xr.DataArray(np.ones((3, 3), np.float32), dims=("gy", "gx"), attrs={"pixel_um": 0.2})
    lsfov.save(xr.Dataset({"v": img, "m": nodes}), tmp_path / "px.zarr")
    ms = json.loads((tmp_path / "px.zarr" / "v" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.2, 0.2]
    assert [a.get("unit") for a in ms["axes"]] == ["micrometer", "micrometer"]
    back = lsfov.open_result(tmp_path / "px.zarr")
    np.testing.assert_allclose(back["v"].x.values, np.arange(8) * 0.2)
    ms = json.loads((tmp_path / "px.zarr" / "m" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 1.0]


def test_damaged_pyramid_levels_and_masks_are_described_as_they_are(tmp_path):
    """A pyramid level's chunk lost from a copy read as zeros (black in a zoomed-out viewer) and
    `info` said nothing; a level or variable lost gave zarr's own error; a mask was described as a
    uint8 image saturating at 255; a 64-bit image at its type's largest value wrapped in its level,
    and a float32 one above 8.5e37 overflowed to inf."""
    from lsfov.io import describe

    lsfov.save(np.random.default_rng(0).random((1024, 1024)).astype(np.float32) + 1, tmp_path / "a.zarr")
    assert "pyramid levels" not in describe(tmp_path / "a.zarr")
    chunk = tmp_path / "a.zarr" / "image" / "1" / "c" / "0" / "0"
    shutil.rmtree(chunk) if chunk.is_dir() else chunk.unlink()
    for p in (tmp_path / "a.zarr", tmp_path / "a.zarr" / "image"):
        assert "chunks not stored in pyramid levels (level 1: 1 of 1): a copy cut short" in describe(p)
    shutil.rmtree(tmp_path / "a.zarr" / "image" / "1")
    with pytest.raises(ValueError, match="the array of pyramid level 1 has no metadata .*; the store is damaged"):
        lsfov.open_result(tmp_path / "a.zarr")
    ds = xr.Dataset({"a": (("y", "x"), np.ones((8, 8))), "mask": (("y", "x"), np.eye(8, dtype=bool))})
    lsfov.save(ds, tmp_path / "m.zarr")
    said = describe(tmp_path / "m.zarr" / "mask")
    assert "shape (8, 8) bool" in said and "saturates" not in said
    shutil.rmtree(tmp_path / "m.zarr" / "mask")
    with pytest.raises(ValueError, match="m.zarr: its variable mask is missing \\(a copy cut short\\)"):
        lsfov.open_result(tmp_path / "m.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "invalid value encountered in cast")
        lsfov.save(np.full((1024, 1024), np.iinfo(np.int64).max, np.int64), tmp_path / "i.zarr")
    assert lsfov.open_image(tmp_path / "i.zarr" / "image", level=1).values.min() > 9.2e18
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "overflow encountered in reduce")
        lsfov.save(np.full((1024, 1024), 3e38, np.float32), tmp_path / "f.zarr")
    assert lsfov.open_image(tmp_path / "f.zarr" / "image", level=1).values.min() == np.float32(3e38)
    # a 1x1 image with coordinates keeps its pixel size for viewers
    one = xr.DataArray(np.ones((1, 1), np.float32), dims=("y", "x"), attrs={"pixel_um": 0.2},
                       coords={d: (d, [2.0], {"units": "micrometer"}) for d in ("y", "x")})
    lsfov.save(one, tmp_path / "o.zarr")
    assert lsfov.open_image(tmp_path / "o.zarr" / "image").attrs["pixel_um"] == 0.2


def test_a_tables_row_labels_are_kept(tmp_path):
    """A table's rows labelled (sources by name, detections by time) came back numbered 0..n-1."""
    rows = {"source": ("source", ["bead a", "bead b"], {"note": "picked"}),
            "when": ("when", np.array(["2026-01-01T00:00", "2026-01-02T00:00"], "datetime64[ns]"))}
    for dim, labels in rows.items():
        t = xr.DataArray(np.ones((2, 3)), dims=(dim, "column"), coords={dim: labels, "column": ["y", "x", "a"]})
        lsfov.save(xr.Dataset({"t": t, "u": t.rename({dim: "other"}).drop_vars("other")}), tmp_path / f"{dim}.zarr")
        back = lsfov.open_result(tmp_path / f"{dim}.zarr")
        xr.testing.assert_identical(back.t.drop_attrs(deep=False), t.rename("t"))
        assert "other" not in back.u.coords  # (none stored, none made up)
    assert back.t.when.dtype == np.dtype("datetime64[ns]")
    assert lsfov.open_result(tmp_path / "source.zarr").t.source.attrs == {"note": "picked"}


def test_a_saved_map_and_image_read_back_on_their_coordinates_to_the_bit(tmp_path):
    """Node positions read back differed in their last bits (12.700000000000001 against 12.7): xarray
    aligned a map with its saved copy on 2 x 3 of its 5 x 7 nodes and ``.sel(gx=12.7)`` failed; a
    one-node map saved again lost its node spacing (a 1 µm tile in a viewer)."""
    import json

    m = lsfov.estimate_psf_map(np.random.default_rng(0).random((384, 512)), "G1", stride=64, pixel_um=0.2, fill=False)
    r = lsfov.open_result(lsfov.save(m, tmp_path / "m.zarr"))
    for d in ("gy", "gx"):
        np.testing.assert_array_equal(r[d].values, m[d].values)
    assert (m.sigma - r.sigma).sizes == m.sigma.sizes and m.sel(gx=51.1, gy=38.3).sigma.size == 1
    im = lsfov.io.with_pixel_size(np.ones((3, 40), np.float32), 0.2)
    back = lsfov.open_image(lsfov.save(im, tmp_path / "i.zarr") / "image")
    np.testing.assert_array_equal(back.x.values, im.x.values)
    assert im.sel(x=0.6).size == 3
    one = r.isel(gy=[1], gx=[2])
    again = lsfov.open_result(lsfov.save(lsfov.open_result(lsfov.save(one, tmp_path / "1.zarr")), tmp_path / "2.zarr"))
    meta = json.loads((tmp_path / "2.zarr" / "sigma" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"] == [12.8, 12.8]
    assert float(again.gx[0]) == float(m.gx[2]) and again.gx.attrs["step"] == 12.8


def test_a_pyramid_level_named_by_its_path_is_read_at_its_scale(tmp_path):
    """``r.zarr/image/0`` (a level's array, as a file browser shows it) was read as a plain zarr
    array, in pixels: its map in pixels, no warning of a model trained at another pixel size."""
    im = lsfov.io.with_pixel_size(np.ones((1024, 1024), np.float32), 0.1)
    lsfov.save(im, tmp_path / "r.zarr")
    for k, px in ((0, 0.1), (1, 0.2)):
        level = lsfov.open_image(tmp_path / "r.zarr" / "image" / str(k))
        assert level.attrs["pixel_um"] == px and level.x.attrs["units"] == "micrometer"
        xr.testing.assert_identical(level.drop_attrs(), lsfov.open_image(tmp_path / "r.zarr" / "image", level=k)
                                    .drop_attrs())
    with pytest.raises(ValueError, match=r"image/1 is pyramid level 1 of the image .*image; open that image with level=1"):
        lsfov.open_image(tmp_path / "r.zarr" / "image" / "1", level=1)
    m = lsfov.estimate_psf_map(np.random.default_rng(0).random((256, 256)), "G1", pixel_um=0.2, fill=False)
    lsfov.save(m, tmp_path / "m.zarr")
    with pytest.raises(ValueError, match=r"sigma/0 is a level of .*sigma, a variable on a PSF map's node grid"):
        lsfov.open_image(tmp_path / "m.zarr" / "sigma" / "0")
