"""Generated gRPC/protobuf code for package kms.v1 (from protos/kms/v1/*.proto; `make protos` regenerates it)."""
