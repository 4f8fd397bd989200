"""Master frames of a night: the dask reductions (:mod:`.reduce`), the recipe bias →
darks → flats → bad-pixel mask with reuse and fallback (:mod:`.builder`), and the master
files themselves (:mod:`.store`)."""
