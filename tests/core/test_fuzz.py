"""Property-based tests: header parsing, classification and the numeric core never crash,
and NaN never leaks unmasked into SCI or VAR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from astep_dask.config import CosmicSettings
from astep_dask.core.bits import Bit
from astep_dask.core.calibrate import Detector, FrameMasters, Section, calibrate_frame
from astep_dask.core.combine import NoiseModel, clip_combine
from astep_dask.io.headers import FrameType, classify, type_from_text

printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@given(value=printable, name=st.text(st.characters(min_codepoint=48, max_codepoint=122),
                                     min_size=1, max_size=20))
def test_classify_never_crashes(value, name):
    header = fits.Header()
    header["ACQTYPE"] = value
    kind, note = classify(header, Path(f"{name}.fits"))
    assert isinstance(kind, FrameType) and isinstance(note, str)
    if type_from_text(value) is not FrameType.UNKNOWN:
        assert kind == type_from_text(value)


@given(x1=st.integers(1, 5000), x2=st.integers(1, 5000), y1=st.integers(1, 5000),
       y2=st.integers(1, 5000))
def test_section_round_trip(x1, x2, y1, y2):
    s = Section.from_fits(f"[{x1}:{x2},{y1}:{y2}]")
    assert s.shape == (abs(y2 - y1) + 1, abs(x2 - x1) + 1)
    assert Section.from_fits(s.to_fits()) == s


@given(text=printable)
def test_section_rejects_garbage_cleanly(text):
    try:
        Section.from_fits(text)
    except ValueError:
        pass


def _with_nan(lo: float, hi: float, inf: bool = False):
    extra = [st.just(np.nan)] + ([st.just(np.inf), st.just(-np.inf)] if inf else [])
    return st.one_of(st.floats(lo, hi, width=32), *extra)


finite_or_not = _with_nan(-1e6, 1e6)


@settings(max_examples=60, deadline=None)
@given(cube=arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 6),
                                         st.integers(1, 6)), elements=finite_or_not),
       method=st.sampled_from(["sigclip", "median"]), noise=st.booleans())
def test_clip_combine_never_crashes(cube, method, noise):
    model = NoiseModel(gain=1.5, read_noise=10.0, pedestal=None) if noise else None
    out = clip_combine(cube, method=method, noise=model)
    assert out.shape == (3, *cube.shape[1:])
    count = out[2]
    enough = np.isfinite(cube).sum(axis=0) > 0
    assert np.all(count <= cube.shape[0])
    assert np.all(np.isfinite(out[0][enough & (count > 0)]))


@settings(max_examples=40, deadline=None)
@given(
    raw=arrays(np.float32, (24, 24), elements=st.floats(0, 70000, width=32)),
    flat=arrays(np.float32, (24, 24), elements=_with_nan(-2, 3, inf=True)),
    dark=arrays(np.float32, (24, 24), elements=_with_nan(0, 5000)),
    gain=st.floats(0.1, 10), rn=st.floats(0, 50),
)
def test_calibrate_frame_never_leaks_nan(raw, flat, dark, gain, rn):
    fm = FrameMasters(dark=dark, dark_var=np.ones_like(dark), dark_current=np.zeros_like(dark),
                      flat=flat, flat_var=np.zeros_like(flat), mask=np.zeros((24, 24), np.int32))
    sci, var, mask, _ = calibrate_frame(raw, fm, Detector(gain, rn, 65535.0),
                                        CosmicSettings(enabled=False))
    unmasked = (mask & (1 << Bit.NO_DATA)) == 0
    assert np.all(np.isfinite(sci[unmasked]))
    assert np.all(np.isfinite(var[unmasked])) and np.all(var[unmasked] >= 0)
