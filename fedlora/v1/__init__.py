"""Generated protobuf modules for the fedlora.v1 wire format (see proto/)."""
