"""The gRPC surface: servicers, request conversion, auth, status mapping, health, lifecycle."""
