"""Tandem: one frozen base model, many LoRA adapters, served over gRPC.

`tandem.client` is the Python client, `tandem.server` the server, `tandem.kernels` the
batched-LoRA kernels, `tandem.v1` the generated gRPC stubs."""

__version__ = "0.1.0"
