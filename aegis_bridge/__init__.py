"""aegis-bridge: desktop notifications for AegisLink events (issue 8; not built yet)."""
