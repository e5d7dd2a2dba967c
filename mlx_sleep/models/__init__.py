from .hybrid import Block, HybridLM

__all__ = ["Block", "HybridLM"]
