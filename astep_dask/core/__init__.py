"""The core: numpy arrays in, numpy arrays out; no files, no cluster.

Mask bits (:mod:`.bits`), robust statistics (:mod:`.stats`), the combination of frames
(:mod:`.combine`), the dark model (:mod:`.darks`), the bad-pixel mask (:mod:`.badpix`), the
per-frame chain (:mod:`.calibrate`), cosmic rays (:mod:`.cosmics`, with the stamp fits of
:mod:`.psf`), the sky background (:mod:`.background`) and star registration
(:mod:`.register`). Every function is testable on small arrays without a disk.
"""
