"""Nested learning: models whose forward pass is optimisation (Titans, MIRAS, Atlas, TNT, Lattice, Trellis, HOPE).

Config in `config.py` (root `CONFIG_MODEL`); the memory rules live in `cambium.nn.memory`. The context stream is
`stream.py`, the MAG / SWA-only models `model.py`, the build loop with exact resume and evaluation `build.py`, the
`cambium nested` commands `cli.py`.
"""
