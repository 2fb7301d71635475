"""The Tandem server: engine, model, adapters, fine-tuning and the gRPC API."""
