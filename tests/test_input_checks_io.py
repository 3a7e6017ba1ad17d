"""Bad input that reaches lsfov's readers and writers (images, results, batch systems) through the
public calls and the CLI: each refused with one line that says what is wrong and what to do, not a
traceback from NumPy, zarr or tifffile, nor an option that does not exist."""
import pickle
import sys

import numpy as np
import pytest
import tifffile
import xarray as xr
import zarr

import lsfov
from lsfov import io
from refusals import one_line


def test_open_image_refuses_stores_levels_and_arrays_it_cannot_read(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").attrs["note"] = "no image"
    lsfov.save(np.ones((8, 8), np.float32), tmp_path / "r.zarr")
    tifffile.imwrite(tmp_path / "app.tif", np.ones((8, 8), np.uint16))
    tifffile.imwrite(tmp_path / "app.tif", np.ones((8, 8), np.uint16), append=True)  # two series: a z-stack
    np.save(tmp_path / "a.npy", np.ones((8, 8), np.float32))
    whole = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:20])  # its header cut short
    (tmp_path / "short.npy").write_bytes(whole[:-10])  # its pixels cut short
    np.save(tmp_path / "empty.npy", np.ones((0, 8), np.float32))
    np.save(tmp_path / "empty3.npy", np.ones((3, 0, 8), np.float32))
    zarr.create_array(str(tmp_path / "arr.zarr"), shape=(8, 8), dtype="f4", fill_value=1)  # a plain array
    cases = [
        (dict(path=tmp_path / "plain.zarr"), r"no OME-Zarr multiscale image in it; give an OME-Zarr image"),
        (dict(path=tmp_path / "r.zarr" / "image", level=3), r"pyramid level 3 does not exist \(levels 0..0\)"),
        (dict(path=tmp_path / "r.zarr", level=1), r"pyramid level 1 does not exist \(levels 0..0\)"),
        (dict(path=tmp_path / "app.tif", level=1), r"app.tif: pyramid level 1 does not exist \(levels 0..0\)"),
        (dict(path=tmp_path / "arr.zarr", level=2), r"arr.zarr: pyramid level 2 does not exist \(a plain zarr array"),
        (dict(path=tmp_path / "r.zarr" / "image" / "0", level=1), r"image/0 is pyramid level 0 of the image .*; open "
                                                                   r"that image with level=0"),
        (dict(path=tmp_path / "cut.npy"), r"cut.npy: not a readable .npy array \(.*\); write it again with numpy.save"),
        (dict(path=tmp_path / "short.npy"), r"short.npy: not a readable .npy array \(.*\); write it again"),
        (dict(path=tmp_path / "empty.npy"), r"the image is empty \(shape \(0, 8\)\); give an image with pixels"),
        (dict(path=tmp_path / "empty3.npy", z=1), r"the image is empty \(shape \(0, 8\)\)"),
    ]
    for kw, what in cases:
        with pytest.raises(ValueError, match=what) as err:
            lsfov.open_image(**kw)
        one_line(err)
    assert lsfov.open_image(tmp_path / "app.tif", z=1).shape == (8, 8)  # (level 0 of the same file reads)
    assert lsfov.open_image(tmp_path / "arr.zarr", level=0).shape == (8, 8)


@pytest.mark.parametrize("flag,dim", [("z", "z"), ("t", "t"), ("channel", "c")])
def test_an_index_for_an_axis_the_image_lacks_is_refused_unless_it_is_the_only_plane(tmp_path, flag, dim):
    np.save(tmp_path / "a.npy", np.arange(64, dtype=np.float32).reshape(8, 8))
    for idx in (0, -1):  # the one plane there is
        np.testing.assert_array_equal(lsfov.open_image(tmp_path / "a.npy", **{flag: idx}).values,
                                      np.arange(64).reshape(8, 8))
    with pytest.raises(ValueError, match=rf"a.npy: {flag}=2 \(--{flag}\) given but the image has no {dim} axis") as err:
        lsfov.open_image(tmp_path / "a.npy", **{flag: 2})
    one_line(err)


def test_open_planes_says_which_channel_to_choose(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((8, 8), np.float32))
    np.save(tmp_path / "c.npy", np.ones((2, 3, 8, 8), np.float32))  # (c, z, y, x)
    with pytest.raises(io.PlaneNotChosen, match=r"c.npy: the image has 2 channels; choose one with channel= "
                                                r"\(--channel\)") as err:
        io.open_planes(tmp_path / "c.npy")
    assert (err.value.dim, err.value.n) == ("c", 2)
    one_line(err)
    assert len(io.open_planes(tmp_path / "c.npy", channel=1)) == 3
    with pytest.raises(ValueError, match=r"channel=1 \(--channel\) given but the image has no c axis") as err:
        io.open_planes(tmp_path / "a.npy", channel=1)
    one_line(err)


def test_tiff_axes_lsfov_does_not_pick_along_are_named_without_a_made_up_option(tmp_path):
    """A TIFF's lambda (E) axis, or one without y or x: no e= or --e to suggest; what to do instead."""
    tifffile.imwrite(tmp_path / "eyx.tif", np.ones((2, 8, 8), np.uint16), metadata={"axes": "EYX"})
    with pytest.raises(io.PlaneNotChosen, match=r"2 elements along 'e' \(dims \('e', 'y', 'x'\)\); lsfov picks "
                                                "planes along c, z and t only: save the plane you mean") as err:
        lsfov.open_image(tmp_path / "eyx.tif")
    assert "--e" not in one_line(err) and err.value.dim == "e"
    assert len(io.open_planes(tmp_path / "eyx.tif")) == 2  # a bead stack takes every plane
    tifffile.imwrite(tmp_path / "qx.tif", np.ones((2, 8), np.uint16), metadata={"axes": "QX"})  # (Q read as z)
    with pytest.raises(ValueError, match=r"need a 2-D \(y, x\) image, got dims \('x',\) with shape \(8,\); save it "
                                         "with a y and an x axis") as err:
        lsfov.open_image(tmp_path / "qx.tif", z=0)
    one_line(err)
    data = np.arange(16, dtype=np.uint16).reshape(2, 8)
    tifffile.imwrite(tmp_path / "xy.tif", data, metadata={"axes": "XY"})  # stored x first: read as (y, x)
    xy = lsfov.open_image(tmp_path / "xy.tif")
    assert xy.dims == ("y", "x")
    np.testing.assert_array_equal(xy.values, data.T)


def test_save_and_open_result_refuse_what_they_cannot_hold_or_find(tmp_path):
    for obj, name, shape in ((xr.Dataset({"v": ("x", np.ones(3))}), "v", r"\(3,\)"),
                             (xr.Dataset({"v": (("y", "x"), np.ones((0, 3)))}), "v", r"\(0, 3\)"),
                             (xr.DataArray(np.ones((1, 1, 2, 2)), dims=("t", "c", "y", "x")), "image", r"\(1, 1, 2, 2\)")):
        with pytest.raises(ValueError, match=rf"variable '{name}' has shape {shape}; each variable must be a "
                                             "non-empty 2-D or 3-D array") as err:
            lsfov.save(obj, tmp_path / "s.zarr")
        one_line(err)
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(FileNotFoundError, match="no such result: .*none.zarr") as err:
        lsfov.open_result(tmp_path / "none.zarr")
    one_line(err)


def test_a_npy_rewritten_after_it_was_opened_is_not_read_as_the_new_file(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((8, 8), np.float32))
    sent = pickle.dumps(lsfov.open_image(tmp_path / "a.npy").data)  # as to another process
    np.save(tmp_path / "a.npy", np.ones((9, 9), np.float32))
    with pytest.raises(ValueError, match=r"a.npy changed after it was opened \(rewritten during the run\?\); "
                                         "open it again") as err:
        pickle.loads(sent).compute()
    one_line(err)


def test_batch_systems_unknown_or_without_dask_jobqueue_are_refused(monkeypatch):
    from lsfov import cluster

    with pytest.raises(ValueError, match=r"unknown batch system 'sge'; use one of \['pbs', 'slurm'\]") as err:
        cluster.jobqueue_cluster("sge")
    one_line(err)
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # not installed: its import fails
    with pytest.raises(ValueError, match=r"--scheduler slurm needs dask-jobqueue: pip install dask-jobqueue") as err:
        cluster.jobqueue_cluster("slurm", cores=1, memory="1GB")
    one_line(err)
    monkeypatch.setattr(cluster.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"--scheduler pbs needs dask-jobqueue: pip install dask-jobqueue") as err:
        cluster.parse_scheduler("pbs:2")
    one_line(err)


def _subspace(path, **attrs):
    from lsfov.calibrate import OperatorSubspace

    rng = np.random.default_rng(0)
    OperatorSubspace(np.ones((2, 5, 5)) / 25, rng.uniform(0.5, 1, (3, 16, 16)), rng.uniform(0.1, 1, (4, 2, 3)),
                     attrs=attrs).save(path)


def test_cli_info_of_an_operator_subspace_says_its_beads_where_known(run, tmp_path):
    _subspace(tmp_path / "sub.zarr", n_beads=7)
    _subspace(tmp_path / "bare.zarr")
    out = run("info", "sub.zarr").output
    assert out.splitlines() == ["sub.zarr: lsfov operator subspace",
                                "  OperatorSubspace(n_psf=2, n_space=3, n_images=4, shape=(16, 16), K=5)",
                                "  beads 7"]
    assert "beads" not in run("info", "bare.zarr").output  # not "beads None"


def test_cli_refuses_a_psf_file_of_several_images_and_non_square_pixels_for_a_subspace(run, tmp_path):
    rng = np.random.default_rng(1)
    img = rng.random((16, 16)).astype(np.float32)
    np.save(tmp_path / "im.npy", img)
    with tifffile.TiffWriter(tmp_path / "psf.ome.tif", ome=True) as tif:  # two PSFs, as two stage positions
        for _ in range(2):
            tif.write(np.ones((5, 5), np.float32))
    res = run("deconvolve", "im.npy", "d.zarr", "--psf", "psf.ome.tif", ok=False)
    assert res.exit_code == 1
    assert res.output.strip() == ("Error: psf.ome.tif: a PSF file of 2 images; save the PSF you mean as a file of "
                                  "its own")
    assert not (tmp_path / "d.zarr").exists()
    # a subspace learned in µm: the image's pixel size is needed, and refused when not square
    _subspace(tmp_path / "sub.zarr", pixel_um=0.2)
    tifffile.imwrite(tmp_path / "an.ome.tif", img, metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.4})
    res = run("bss", "an.ome.tif", "o.zarr", "--subspace", "sub.zarr", "--iterations", "2", ok=False)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "its pixels are not square (y 0.4 µm, x 0.2 µm)" in lines[0] and "--pixel-um" in lines[0]
    assert not (tmp_path / "o.zarr").exists()
