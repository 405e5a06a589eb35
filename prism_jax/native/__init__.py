"""C++ kernels for XLA:CPU, compiled on first use and called through the XLA FFI.

native_matmul: the grouped matmul of the `native` backend (float32).
load_kernels:  compile (or reuse the cached build of) the kernels and register them with JAX.
"""

from prism_jax.native.build import KernelBuildError, load_kernels, native_available
from prism_jax.native.matmul import native_matmul
