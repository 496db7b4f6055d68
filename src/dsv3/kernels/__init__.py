"""GPU kernels shared by several layers of dsv3 (Triton, imported lazily: Triton is optional).

Kernels import nothing from their callers; each module keeps a plain PyTorch reference in its docstring or
in the module that calls it, and tests compare the two.
"""
