"""Pure NumPy kernels of the night calibrations (no Dask, no xarray).

Each kernel works on one spatial tile of a stack, ``(frame, y, x)``, and returns per-pixel
results for that tile; :mod:`mstdask.calib` applies them tile by tile over a store.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clipped_mean", "in_strips", "moment_sums", "group_moments", "ps_from_moments"]


def clipped_mean(stack: np.ndarray, sigma: float = 3.0, maxiters: int = 5) -> np.ndarray:
    """Per-pixel sigma-clipped mean over axis 0, as ``ccdproc.combine`` computes it.

    ``astropy.stats.sigma_clip(cenfunc="median", stdfunc="std")`` (astropy's compiled
    implementation: 3x faster than a sorted-run kernel of our own, measured on 110 x
    300 x 450 tiles) followed by the mean of the kept values. A pixel whose values are all
    rejected (impossible with a median centre, kept for safety) falls back to the median.

    Parameters
    ----------
    stack : ndarray, shape (n, ny, nx)
        The frames (any real dtype).
    sigma : float
        Clipping threshold in standard deviations.
    maxiters : int
        Maximum clipping iterations.

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    from astropy.stats import sigma_clip

    clipped = sigma_clip(stack, sigma=sigma, maxiters=maxiters, axis=0, cenfunc="median", stdfunc="std",
                         masked=True)
    mean = clipped.mean(axis=0)
    if np.ma.is_masked(mean):
        mean = mean.filled(np.nan)
        bad = np.isnan(mean)
        mean[bad] = np.median(np.asarray(stack)[:, bad], axis=0)
    return np.asarray(mean, dtype=np.float32)


def in_strips(kernel, stack: np.ndarray, max_bytes: int, n_out: int | None = None,
              dtype=np.float32) -> np.ndarray:
    """Apply a per-pixel stack kernel to row strips of ``stack`` and assemble the result.

    A whole stored tile of every frame is read once per task (decoding it in parts would
    decode it once per part); the kernel's float64 temporaries are then bounded by
    ``max_bytes`` through the strip height, whatever the number of frames.

    Parameters
    ----------
    kernel : callable
        ``kernel(stack[:, rows]) -> (strip_rows, nx)`` or ``(n_out, strip_rows, nx)``.
    stack : ndarray, shape (n, ny, nx)
    max_bytes : int
        Budget of one strip as float64: ``n * rows * nx * 8 <= max_bytes`` (at least one row).
    n_out : int, optional
        Leading dimension of the kernel's result, when it has one.
    dtype : dtype
        Of the result.
    """
    n, ny, nx = stack.shape
    rows = int(max(1, min(ny, max_bytes // max(1, n * nx * 8))))
    shape = (ny, nx) if n_out is None else (n_out, ny, nx)
    out = np.empty(shape, dtype=dtype)
    for y0 in range(0, ny, rows):
        out[..., y0:y0 + rows, :] = kernel(stack[:, y0:y0 + rows])
    return out


def moment_sums(block: np.ndarray, offset: float) -> np.ndarray:
    """Per-pixel sum and sum of squares over axis 0 of a block of frames, frame by frame.

    The streaming half of a one-pass mean/variance: partial sums of blocks of a few
    frames add up to the sums over any number of frames, and only two float64 planes
    are ever held.

    Parameters
    ----------
    block : ndarray, shape (n, ny, nx)
    offset : float
        Subtracted first, so float64 sums of squares keep their precision (the bias level).

    Returns
    -------
    ndarray of float64, shape (2, ny, nx): sums, sums of squares.
    """
    out = np.zeros((2,) + block.shape[1:], dtype=np.float64)
    d = np.empty(block.shape[1:], dtype=np.float64)
    for frame in block:
        np.subtract(frame, offset, out=d, dtype=np.float64)
        out[0] += d
        d *= d
        out[1] += d
    return out


def group_moments(stack: np.ndarray, groups: np.ndarray, n_groups: int, offset: float) -> np.ndarray:
    """Per-group count, sum and sum of squares over axis 0, in one pass over the tile.

    Parameters
    ----------
    stack : ndarray, shape (n, ny, nx)
    groups : ndarray of int, shape (n,)
        Group of each frame, ``0 .. n_groups-1``.
    n_groups : int
    offset : float
        Subtracted before summing so the sums of squares keep their precision in float64
        (the bias level, ~500 ADU).

    Returns
    -------
    ndarray of float64, shape (n_groups, 3, ny, nx)
        ``[:, 0]`` counts, ``[:, 1]`` sums, ``[:, 2]`` sums of squares.
    """
    ny, nx = stack.shape[1:]
    out = np.zeros((n_groups, 3, ny, nx), dtype=np.float64)
    for g in range(n_groups):
        sel = np.flatnonzero(groups == g)
        if sel.size == 0:
            continue
        d = stack[sel].astype(np.float64) - offset
        out[g, 0] = sel.size
        out[g, 1] = d.sum(axis=0)
        out[g, 2] = np.einsum("ijk,ijk->jk", d, d)
    return out


def ps_from_moments(moments: np.ndarray, threshold: float, offset: float) -> dict[str, np.ndarray]:
    """Per-group mean and std, and the pepper-and-salt decision, from :func:`group_moments`.

    Parameters
    ----------
    moments : ndarray, shape (n_groups, 3, ny, nx)
    threshold : float
        A pixel is PS in a group when its std over that group's frames exceeds this (ADU).
    offset : float
        The offset used by :func:`group_moments`.

    Returns
    -------
    dict
        ``group_mean``, ``group_std`` (float32, (n_groups, ny, nx)), ``group_ps`` (bool),
        ``mean`` and ``std`` over all frames (float32, (ny, nx)), ``ps`` (bool: PS in every
        group, the paper's intersection).
    """
    n, s, ss = moments[:, 0], moments[:, 1], moments[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        gmean = s / n
        gvar = np.clip((ss - s * s / n) / (n - 1), 0.0, None)
        N, S, SS = n.sum(0), s.sum(0), ss.sum(0)
        var = np.clip((SS - S * S / N) / (N - 1), 0.0, None)
    gstd = np.sqrt(gvar)
    gps = gstd > threshold
    return {
        "group_mean": (gmean + offset).astype(np.float32),
        "group_std": gstd.astype(np.float32),
        "group_ps": gps,
        "mean": (S / N + offset).astype(np.float32),
        "std": np.sqrt(var).astype(np.float32),
        "ps": gps.all(axis=0),
    }

