"""The KBMOD export of a calibrated night and a first-look search for moving objects.

:func:`export_night` turns a night's calibrated frames into the input of KBMOD
(Kernel-Based Moving Object Detection) in ``OUTPUT/kbmod/``, running each step as tasks
on the dask cluster (:mod:`.stage`):

1. **measure**: background, stars and PSF of every frame (:mod:`.export`);
2. **reference**: the frame whose grid every product shares, recorded so that a re-run
   keeps it (:mod:`.products`);
3. **register**: offset to the reference, sky subtraction, resampling onto its grid
   (:mod:`.export`);
4. **template**: a static-sky template from the registered frames of the night
   (leave-one-out) or of neighbouring nights, PSF-matched and combined with clipping
   (:mod:`.template`, kernels in :mod:`.kernels`);
5. **differences**: one KBMOD file per frame, frame − template (:mod:`.difference`);

then the night stack, offsets table and ``kbmod.json``. :func:`search_night` then
searches the KBMOD files by shift-and-stack over a grid of velocities (:mod:`.search`,
the method in :mod:`.shiftstack`) and writes the candidates and their postage stamps
(:mod:`.candidates`, read back by :func:`read_candidates`).
"""

from astep_dask.kbmod.candidates import CSV_COLUMNS, read_candidates
from astep_dask.kbmod.search import search_night
from astep_dask.kbmod.stage import export_night
from astep_dask.kbmod.template import read_template

__all__ = ["CSV_COLUMNS", "export_night", "read_candidates", "read_template", "search_night"]
