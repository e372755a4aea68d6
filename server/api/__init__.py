"""The gRPC surface: servicers, conversions, status mapping and the server itself."""
