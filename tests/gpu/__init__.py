"""CuPy-path tests: on the CuPy stand-in and on a CUDA device (conftest.py)."""
