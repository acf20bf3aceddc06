"""ffnskip tuning service: multi-objective search over FFN skip policies (Ray Tune + Optuna),
with every study, trial, sample and dense baseline kept in a SQL store.

Layering: ``ffnskip`` (core) <- ``tuning`` <- ``serve``. Importing this package does not import
Ray; only :mod:`tuning.ray_runner` does.
"""
