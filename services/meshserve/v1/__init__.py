"""Generated gRPC stubs of protos/meshserve/v1 (scripts/gen_protos.py). Do not edit."""
