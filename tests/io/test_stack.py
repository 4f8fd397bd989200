"""Lazy stacks: exact uint16 decoding, laziness, row strips."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.io import stack as stack_mod
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import read_record, scan_night
from astep_dask.io.stack import open_stack, open_strips, read_frame, strip_rows

EDGE_VALUES = np.array([0, 1, 32767, 32768, 32769, 65534, 65535], np.uint16)


def _uint16_file(path: Path, data: np.ndarray, **kw) -> Path:
    hdu = fits.PrimaryHDU(data)
    hdu.header["ACQTYPE"] = "DARK"
    hdu.header["EXPTIME"] = 1.0
    hdu.writeto(path, **kw)
    return path


def test_uint16_bzero_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 65536, (37, 41), dtype=np.uint16)
    data[0, : EDGE_VALUES.size] = EDGE_VALUES
    path = _uint16_file(tmp_path / "u.fits", data)
    header = fits.getheader(path)
    assert header["BITPIX"] == 16 and header["BZERO"] == 32768
    got = read_frame(read_record(path))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, data.astype(np.float64))


@pytest.mark.parametrize("suffix", [".fits.gz", ".fits.fz"])
def test_compressed_inputs_decode_exactly(tmp_path, suffix):
    data = np.random.default_rng(1).integers(0, 65536, (32, 48), dtype=np.uint16)
    path = tmp_path / f"c{suffix}"
    if suffix == ".fits.fz":
        hdu = fits.CompImageHDU(data, compression_type="RICE_1")
        hdu.header["ACQTYPE"] = "DARK"
        hdu.header["EXPTIME"] = 1.0
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    else:
        _uint16_file(path, data)
    rec = read_record(path)
    assert rec.usable, rec.problem
    assert rec.shape == (32, 48)
    np.testing.assert_array_equal(read_frame(rec), data.astype(np.float32))
    np.testing.assert_array_equal(open_stack([rec], rows=10).values[0], data)


def _count_reads(monkeypatch, *modules) -> Counter:
    """Pixels read per file through ``read_section`` of the stack module (and of the
    other ``modules`` that imported it by name)."""
    calls: Counter = Counter()
    real = stack_mod.read_section

    def counting(path, hdu, rows, cols, out=None):
        out = real(path, hdu, rows, cols, out=out)
        calls[str(path)] += out.shape[0] * out.shape[1]
        return out

    for module in (stack_mod, *modules):
        monkeypatch.setattr(module, "read_section", counting)
    return calls


def test_open_stack_reads_nothing_until_computed(small_night, monkeypatch):
    recs = scan_night(small_night).select(FrameType.DARK)
    # 200 frames: the same few files listed many times over.
    many = [recs[i % len(recs)] for i in range(200)]
    calls = _count_reads(monkeypatch)
    st = open_stack(many)
    assert st.dims == ("frame", "y", "x")
    assert st.shape == (200, 128, 128)
    assert st.dtype == np.float32
    assert st.data.chunks[0] == (1,) * 200
    assert list(st.exptime.values[:2]) == [recs[0].exptime, recs[1].exptime]
    assert str(st.path.values[0]) == str(recs[0].path)
    assert sum(calls.values()) == 0
    one = st.isel(frame=3).values
    assert sum(calls.values()) == 128 * 128
    np.testing.assert_array_equal(one, read_frame(many[3]))


def test_strips_read_every_pixel_once(small_night, monkeypatch):
    recs = scan_night(small_night).select(FrameType.DARK)
    band = strip_rows(len(recs), (128, 128), budget_mb=0.5)
    assert 1 <= band < 128
    calls = _count_reads(monkeypatch)
    strips = open_strips(recs, budget_mb=0.5)
    assert strips.data.chunks[0] == (len(recs),)
    assert max(strips.data.chunks[1]) == band
    mean = strips.mean("frame").values
    assert calls == Counter({str(r.path): 128 * 128 for r in recs})
    direct = np.mean([read_frame(r) for r in recs], axis=0)
    np.testing.assert_allclose(mean, direct, rtol=1e-6)


def test_open_stack_rejects_mixed_shapes(small_night, tmp_path):
    rec = scan_night(small_night).select(FrameType.DARK)[0]
    other = read_record(_uint16_file(tmp_path / "o.fits", np.zeros((5, 5), np.uint16)))
    with pytest.raises(ValueError, match="differ in shape"):
        open_stack([rec, other])


def test_masters_read_each_input_about_once(small_night, tmp_path, monkeypatch):
    from astep_dask.config import Settings
    from astep_dask.masters import builder, reduce

    inv = scan_night(small_night)
    calls = _count_reads(monkeypatch, reduce)
    builder.MasterBuilder(inv, tmp_path, Settings()).build()
    pixels = 128 * 128
    darks = inv.select(FrameType.DARK)
    flats = inv.select(FrameType.FLAT)
    assert darks and flats
    # Read by the strips, and (no bias frames here) one dark of the shortest and one of
    # the longest exposure time sparsely in the central box, for the bias level.
    extra = sorted(calls[str(rec.path)] - pixels for rec in darks)
    assert extra[:-2] == [0] * (len(darks) - 2)
    assert all(0 < e <= 0.05 * pixels for e in extra[-2:]), extra
    for rec in flats:  # the strips, and every 8th row of the central box for the level
        assert pixels < calls[str(rec.path)] <= 1.05 * pixels
