"""Running the pipeline on a cluster: where it runs (:mod:`.cluster`), bounded task
submission (:mod:`.tasks`), a stop asked for by a signal (:mod:`.stop`), one frame as a
task (:mod:`.frames`), a night (:mod:`.night`), a season (:mod:`.season`) and the ordered
table of stages (:mod:`.stages`)."""
