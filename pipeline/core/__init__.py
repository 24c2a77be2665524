"""Everything stands on this: errors, output paths, atomic I/O, precision and devices, the
params models, seed derivation and the registry of model variants.
"""
