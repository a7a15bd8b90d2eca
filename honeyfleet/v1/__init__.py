"""Generated protobuf and gRPC stubs for honeyfleet.v1 (see scripts/gen_protos.py)."""
