"""Batched-LoRA kernels: Triton on CUDA, plain-torch reference twins on CPU."""
