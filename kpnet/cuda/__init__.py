"""CUDA C kernels for kpnet.ops, run by CuPy on CUDA tensors or by the g++ emulator on CPU tensors."""
