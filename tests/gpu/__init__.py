"""GPU checks: `make gpu-check` runs gpu_check.py on a machine with CUDA (not a pytest module; see its docstring)."""
