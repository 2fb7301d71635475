"""The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions, /v1/models, on
the same engine, admission, auth and error mapping as the gRPC services."""
