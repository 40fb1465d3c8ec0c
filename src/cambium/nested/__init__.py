"""Nested learning: models whose forward pass is optimisation (Titans, MIRAS, Atlas, TNT, Lattice, Trellis, HOPE).

Config in `config.py` (root `CONFIG_MODEL`); the memory rules live in `cambium.nn.memory`.
"""
