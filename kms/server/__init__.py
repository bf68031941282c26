"""The gRPC server: frame (mutual TLS, interceptor), authorization policy, `kms serve`, one module per service."""
