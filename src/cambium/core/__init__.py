"""The shared core: config, errors, runs, metrics, checkpoints, optimizers, schedules, distributed, progress.

`cambium.core` imports nothing else from cambium; everything else may import it.
"""
