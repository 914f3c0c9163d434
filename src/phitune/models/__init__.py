"""Model references: URIs of registered, logged and checkpointed models (phitune.models.uri)."""
