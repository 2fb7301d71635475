"""The model: our own Llama-family forward pass and the loader that fills it."""
