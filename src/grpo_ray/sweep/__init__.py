"""The sweep's driver: preflight, the search (Ray Tune + Optuna), the winner, its export.

* ``driver.py``: the path of one sweep, preflight -> search -> select -> export -> best.json, and
  the re-export of a finished run;
* ``search.py``: the Tuner, OptunaSearch, Ray start-up, resume, warm start from previous runs;
* ``searcher.py``: the Optuna searcher Tune runs (the baseline queued once per run);
* ``early_stop.py``: ASHA from the spec, stopped trials told to Optuna as PRUNED;
* ``packing.py``: ``resources.gpu: auto`` and ``max_concurrent_trials: auto``;
* ``tune_progress.py``: Tune's trial events to the CLI's progress display.
"""
