"""aegis-bridge: desktop notifications for AegisLink events (docs/api.md, "aegis-bridge")."""
