"""aegis-relay: a metadata-blind store-and-forward server (see docs/relay-protocol.md).

The relay is a separate program: it imports nothing from `aegisd`.
"""
