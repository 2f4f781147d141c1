"""What crosses the network: the payload codec (one schema, ``proto/``), the
typed messages, base-weight deltas and sparse top-k payloads. The generated
protobuf code stays at ``fedlora/v1``, where ``protoc`` puts the
``fedlora.v1`` proto package."""
