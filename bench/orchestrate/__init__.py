"""Everything around one run that is not the run itself: skip what is done (resume.py), never run a config twice
at once (lock.py), retry out-of-memory with smaller micro-batches (oom.py), a process per run in a sweep
(isolate.py), the sweep's progress and summary (sweep.py), and the entry `run(cfg)` that ties them (runner.py)."""
