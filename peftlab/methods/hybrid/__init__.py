"""Methods of this family register themselves on import."""
from peftlab.methods.hybrid import mam, unipelt  # noqa: F401
