"""Structured outputs and `logit_bias`: the API's side (json_layout.py's schema bounds,
compile_guard.py's bounded compile check) and the engine's (masks.py, installed explicitly by a
process that builds an engine: `masks.install_constraints()`). Importing this package loads neither.
"""
