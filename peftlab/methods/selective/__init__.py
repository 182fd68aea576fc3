"""Methods of this family register themselves on import."""
