"""LoRA adapters: the PEFT format on disk, a host-memory cache, a device slot pool."""
