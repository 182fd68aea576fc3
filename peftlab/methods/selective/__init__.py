"""Methods of this family register themselves on import."""
from peftlab.methods.selective import bitfit  # noqa: F401
