"""The library every meshserve service shares: config, gRPC server and channels, errors, telemetry, tokenizers."""
