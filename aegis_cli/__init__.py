"""aegis: the thin command-line client of aegisd (JSON-RPC over its Unix socket)."""
