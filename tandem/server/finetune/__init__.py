"""Fine-tuning jobs: LoRA adapters trained on the served base model, from user datasets."""
