"""CPU emulator for ``mx.fast.metal_kernel`` (see :mod:`.emulator`)."""

from .emulator import (
    EmulatedMetalKernel,
    MetalEmulatorCompileError,
    MetalEmulatorError,
    MetalEmulatorRuntimeError,
    UnsupportedMetalConstruct,
    metal_kernel,
)

__all__ = [
    "EmulatedMetalKernel",
    "MetalEmulatorCompileError",
    "MetalEmulatorError",
    "MetalEmulatorRuntimeError",
    "UnsupportedMetalConstruct",
    "metal_kernel",
]
