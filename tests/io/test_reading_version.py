"""A change of the header reading rules (``io.times.READING_VERSION``) is not hidden by
what an earlier reading cached: the night index drops its records, and every frame's
provenance changes, so a re-run reads the headers again and remakes the frames (a Lowell
night first read with every frame at midnight kept those products otherwise)."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from astep_dask.config import Settings
from astep_dask.io import index as index_mod
from astep_dask.io import provenance
from astep_dask.io.index import RACY_NS, FileIndex
from astep_dask.io.layout import read_record


def _frame(path):
    h = fits.Header({"IMAGETYP": "LIGHT", "EXPTIME": 30.0, "FILTER": "V",
                     "DATE-OBS": "2019-03-26T02:27:31"})
    fits.PrimaryHDU(np.zeros((8, 8), np.uint16), h).writeto(path)
    return path


def test_another_reading_version_drops_cached_records_and_changes_provenance(
        tmp_path, monkeypatch):
    path = _frame(tmp_path / "a.fits")
    st = path.stat()
    index = FileIndex()
    index.record(path, st, "d" * 16, checked_ns=st.st_mtime_ns + 2 * RACY_NS)
    entry = index.entries[str(path.absolute())]
    index.entries[str(path.absolute())] = entry.__class__(
        entry.stamp, entry.digest, entry.checked_ns, entry.written, entry.gz_size,
        {"filter": "V"})
    table = index.to_manifest()
    kept = FileIndex.from_manifest({"files": table})
    assert next(iter(kept.entries.values())).record == {"filter": "V"}
    rec = read_record(path)
    before = provenance.frame_provenance(rec, "m", Settings())
    monkeypatch.setattr(index_mod, "_READER", index_mod._READER + "+1")
    monkeypatch.setattr(provenance, "READING_VERSION", provenance.READING_VERSION + 1)
    again = FileIndex.from_manifest({"files": table})
    assert next(iter(again.entries.values())).record is None  # read the header again
    assert provenance.frame_provenance(rec, "m", Settings()) != before
