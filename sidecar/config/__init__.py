"""The config file: pydantic model (model.py), loader (load.py), compiled Plan (plan.py).

Imports: sidecar.core, sidecar.errors, pydantic, yaml. Never the shell.
"""
