"""`ling sweep`: hyper-parameter search over a training command's config with Optuna.

`spec` checks the sweep config and builds each trial's config; `study` is the Optuna side
(storage, sampler, pruner, running a trial); `outputs` writes the table, trials.csv,
best.yaml and plots; `command` is the command itself, with its worker processes.
"""
