"""Placement: device meshes, process groups and the ``apply_*`` parallelisms."""
