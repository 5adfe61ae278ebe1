"""Configuration: a TOML file checked and compiled into a frozen Runtime (see runtime.py)."""
from .load import load_runtime
from .runtime import Runtime

__all__ = ["load_runtime", "Runtime"]
