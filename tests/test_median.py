"""mstdask.stir._median: the exact running median equals scipy.ndimage.median_filter, bit for bit."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.ndimage as ndi

from mstdask.stir._median import SUPPORTED_MODES, dask_boundary, running_median, running_median_tile

RNG = np.random.default_rng(20261120)


def flat_like(shape, dtype=np.float32, seed=0):
    """A small twilight-flat-like float image: smooth vignetting times 1 % noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    vignetting = 1 - 0.3 * (((x - shape[1] / 2) / shape[1]) ** 2 + ((y - shape[0] / 2) / shape[0]) ** 2)
    return (20000 * vignetting * (1 + 0.01 * rng.standard_normal(shape))).astype(dtype)


NUMPY_PAD = {"reflect": "symmetric", "nearest": "edge", "mirror": "reflect", "wrap": "wrap",
             "constant": "constant"}


def scipy_reference(image, size, mode="reflect", cval=0.0):
    """scipy.ndimage.median_filter, except where scipy reads outside the image.

    scipy 1.17's NI_InitFilterOffsets has an off-by-one for mode='reflect' when the window
    reaches 4 image lengths or more beyond the start of an axis (size // 2 >= 4 * n): the
    position -2k*n maps to -1 instead of 0 and the pixel before the array is read. There
    the reference is scipy on the explicitly extended image (np.pad 'symmetric' is scipy's
    'reflect'), where no border rule is involved.
    """
    r = size // 2
    if mode == "reflect" and image.size and r >= 4 * min(image.shape):
        padded = np.pad(image, r, mode="symmetric")
        return ndi.median_filter(padded, size=size)[r:r + image.shape[0], r:r + image.shape[1]]
    return ndi.median_filter(image, size=size, mode=mode, cval=cval)


def assert_same_as_scipy(image, size, mode="reflect", **kwargs):
    got = running_median(image, size, mode, **kwargs)
    want = scipy_reference(image, size, mode, cval=kwargs.get("cval", 0.0))
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want, err_msg=f"size={size} mode={mode} {kwargs}")
    return got


# --- equality with scipy ---------------------------------------------------------------

@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@pytest.mark.parametrize("size", [3, 5, 51])
def test_float32_random(size, mode):
    image = RNG.normal(1000, 30, (120, 170)).astype(np.float32)
    assert_same_as_scipy(image, size, mode)


def test_flat_like_several_tiles():
    # Tiles of 40 pixels: many tile seams, halos crossing tiles, and the ragged last tiles.
    image = flat_like((150, 197))
    assert_same_as_scipy(image, 51, tile=40)
    assert_same_as_scipy(image, 51, "nearest", tile=37, workers=2)
    assert_same_as_scipy(image, 7, "mirror", tile=13)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int8, np.int32, np.uint32,
                                   np.int64, np.uint64, np.float32, np.float64])
def test_integer_valued_with_many_ties(dtype):
    # Only 4 distinct values in 2601-pixel windows: the median is almost always a tie.
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low = -2 if info is None or info.min < 0 else 0
    image = RNG.integers(low, low + 4, (70, 90)).astype(dtype)
    # The full 51-pixel window for the camera's dtype and for float32; smaller ones elsewhere
    # (scipy needs ~0.3 s per 51-pixel call here, and the suite has a time budget).
    big = 51 if dtype in (np.uint16, np.float32) else 25
    for size, mode in [(big, "reflect"), (5, "nearest"), (3, "wrap"), (9, "mirror")]:
        assert_same_as_scipy(image, size, mode)
    assert_same_as_scipy(image, 11, "constant", cval=1)


def test_extreme_integer_values():
    for dtype in (np.int8, np.int16, np.int32, np.uint16, np.uint32):
        info = np.iinfo(dtype)
        image = RNG.choice(np.array([info.min, info.min + 1, -1 if info.min else 7, 0, info.max - 1,
                                     info.max], dtype=dtype), (33, 41))
        assert_same_as_scipy(image, 7)
        assert_same_as_scipy(image, 31, "nearest")


def test_float64_and_wide_range_floats():
    image = (RNG.standard_normal((64, 75)) * 10.0 ** RNG.integers(-30, 30, (64, 75)))
    assert_same_as_scipy(image, 9)
    assert_same_as_scipy(image.astype(np.float32), 9, "mirror")
    # Negative and positive values around zero, including exact zeros of both signs.
    image = RNG.integers(-3, 4, (40, 50)).astype(np.float32)
    image[RNG.random(image.shape) < 0.2] = -0.0
    assert_same_as_scipy(image, 5)


def test_infinities_are_ordered():
    image = RNG.normal(0, 1, (40, 45)).astype(np.float32)
    image[RNG.random(image.shape) < 0.3] = np.inf
    image[RNG.random(image.shape) < 0.3] = -np.inf
    assert_same_as_scipy(image, 5)
    assert_same_as_scipy(image, 21, "wrap")


def test_bool_and_float16():
    image = RNG.random((30, 40)) < 0.5
    assert_same_as_scipy(image, 5)
    # scipy has no float16 kernel: compare with its float32 result, which is exact too.
    half = RNG.normal(0, 1, (30, 40)).astype(np.float16)
    got = running_median(half, 7, "nearest")
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, ndi.median_filter(half.astype(np.float32), size=7,
                                                         mode="nearest").astype(np.float16))


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (1, 7), (3, 3), (5, 2), (12, 30), (49, 50)])
def test_image_smaller_than_window(shape, mode):
    image = RNG.normal(100, 5, shape).astype(np.float32)
    assert_same_as_scipy(image, 51, mode)
    assert_same_as_scipy(image, 5, mode)


@pytest.mark.parametrize("mode", SUPPORTED_MODES)
def test_extension_equals_numpy_pad(mode):
    # Independent of scipy's border code: the median of the explicitly padded image.
    image = RNG.normal(100, 5, (3, 7)).astype(np.float32)
    size = 41
    r = size // 2
    padded = np.pad(image, r, mode=NUMPY_PAD[mode])
    want = ndi.median_filter(padded, size=size)[r:-r, r:-r]
    np.testing.assert_array_equal(running_median(image, size, mode), want)


def test_constant_mode_cval():
    image = flat_like((40, 60))
    for cval in (0.0, 20000.0, -5.0, 1e9):
        assert_same_as_scipy(image, 11, "constant", cval=cval)


def test_size_one_is_identity():
    image = flat_like((10, 12))
    got = running_median(image, 1)
    np.testing.assert_array_equal(got, image)
    assert got is not image


def test_non_contiguous_and_big_endian_input():
    base = flat_like((90, 120))
    assert_same_as_scipy(base[::2, 1::3], 7)
    assert_same_as_scipy(base.T, 9, "nearest")
    swapped = base.astype(">f4")
    got = running_median(swapped, 5)
    np.testing.assert_array_equal(got, ndi.median_filter(base, size=5))


def test_out_argument():
    image = flat_like((50, 64))
    want = ndi.median_filter(image, size=9)
    out = np.empty_like(image)
    assert running_median(image, 9, out=out) is out
    np.testing.assert_array_equal(out, want)
    out64 = np.empty(image.shape, np.float64)
    assert running_median(image, 9, out=out64) is out64
    np.testing.assert_array_equal(out64, want.astype(np.float64))
    # In place: a temporary keeps the original neighbours available.
    inplace = image.copy()
    assert running_median(inplace, 9, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, want)
    with pytest.raises(ValueError, match="shape"):
        running_median(image, 9, out=np.empty((50, 63), np.float32))


def test_workers_and_tiles_do_not_change_the_result():
    image = flat_like((130, 140), seed=3)
    ref = running_median(image, 21)
    for kwargs in ({"workers": 2}, {"workers": None}, {"tile": 17, "workers": 2}, {"tile": 1000}):
        np.testing.assert_array_equal(running_median(image, 21, **kwargs), ref)


def test_empty_image():
    assert running_median(np.zeros((0, 5), np.float32), 3).shape == (0, 5)


# --- tile + halo path through dask.array.map_overlap -----------------------------------

def test_tile_valid_region_matches_whole_image():
    image = flat_like((90, 110))
    r = 12
    full = ndi.median_filter(image, size=2 * r + 1)
    tile = image[10:70, 20:100]
    got = running_median_tile(tile, 2 * r + 1)
    np.testing.assert_array_equal(got, full[10 + r:70 - r, 20 + r:100 - r])
    kept = running_median_tile(tile, 2 * r + 1, keep_shape=True, tile=9)
    assert kept.shape == tile.shape
    np.testing.assert_array_equal(kept[r:-r, r:-r], got)


DASK_IMAGE = flat_like((120, 170), seed=5)


@functools.lru_cache(maxsize=None)
def dask_reference(size, mode):
    """scipy on the whole DASK_IMAGE, computed once per (size, mode) for all chunkings."""
    return ndi.median_filter(DASK_IMAGE, size=size, mode=mode, cval=18000.0)


@pytest.mark.parametrize("chunks", [(60, 60), (40, 55), ((30, 50, 40), (100, 70)), (120, 170)])
@pytest.mark.parametrize("mode", ["reflect", "nearest", "wrap", "constant"])
def test_dask_map_overlap_equals_scipy(chunks, mode):
    da = pytest.importorskip("dask.array")
    image = DASK_IMAGE
    size = 51
    want = dask_reference(size, mode)
    darr = da.from_array(image, chunks=chunks)
    boundary = dask_boundary(mode, cval=18000.0)
    med = darr.map_overlap(running_median_tile, depth=size // 2, boundary=boundary, size=size,
                           keep_shape=True, dtype=darr.dtype)
    np.testing.assert_array_equal(med.compute(scheduler="sync"), want)
    # The same without the copied halo: trim=False and the output chunks declared.
    med = darr.map_overlap(running_median_tile, depth=size // 2, boundary=boundary, size=size,
                           trim=False, chunks=darr.chunks, dtype=darr.dtype)
    np.testing.assert_array_equal(med.compute(scheduler="sync"), want)


@pytest.mark.parametrize("chunks", [(50, 60), ((30, 50, 40), (100, 70))])
def test_dask_mirror_through_padding(chunks):
    da = pytest.importorskip("dask.array")
    image = DASK_IMAGE
    size, r = 51, 25
    darr = da.from_array(image, chunks=chunks)
    med = da.pad(darr, r, mode="reflect").map_overlap(
        running_median_tile, depth=r, boundary="none", size=size, keep_shape=True,
        dtype=darr.dtype)[r:-r, r:-r]
    np.testing.assert_array_equal(med.compute(scheduler="sync"), dask_reference(size, "mirror"))


def test_dask_boundary_mapping():
    assert dask_boundary("reflect") == "reflect"
    assert dask_boundary("nearest") == "nearest"
    assert dask_boundary("wrap") == "periodic"
    assert dask_boundary("constant", 3.5) == 3.5
    with pytest.raises(ValueError, match="mirror"):
        dask_boundary("mirror")
    with pytest.raises(ValueError, match="mode"):
        dask_boundary("edge")


# --- invalid input ---------------------------------------------------------------------

def test_invalid_input():
    image = flat_like((20, 20))
    with pytest.raises(ValueError, match="2-D"):
        running_median(np.zeros((3, 4, 5), np.float32), 3)
    with pytest.raises(ValueError, match="2-D"):
        running_median(np.zeros(10, np.float32), 3)
    for size in (0, -3, 4, 50):
        with pytest.raises(ValueError, match="odd"):
            running_median(image, size)
    for size in (5.0, True, "5", None):
        with pytest.raises(TypeError, match="size"):
            running_median(image, size)
    with pytest.raises(ValueError, match="mode"):
        running_median(image, 3, mode="edge")
    with pytest.raises(TypeError, match="dtype"):
        running_median(image.astype(np.complex64), 3)
    nan = image.copy()
    nan[3, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\(3, 7\)"):
        running_median(nan, 3)
    with pytest.raises(ValueError, match="NaN"):
        running_median_tile(nan, 3)
    for workers in (0, -1, 1.5):
        with pytest.raises(ValueError, match="workers"):
            running_median(image, 3, workers=workers)
    with pytest.raises(ValueError, match="tile"):
        running_median(image, 3, tile=0)
    with pytest.raises(ValueError, match="halo"):
        running_median_tile(image, 21)
    with pytest.raises(ValueError, match="odd"):
        running_median_tile(image, 4)
