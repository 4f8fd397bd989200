"""Files in and out: the archive layout and its inventory (:mod:`.layout`), lazy stacks
of raw frames (:mod:`.stack`), FITS reading and the one atomic writer (:mod:`.fitsio`),
every product's name and the night's output folder (:mod:`.products`), and provenance
hashes (:mod:`.provenance`)."""
