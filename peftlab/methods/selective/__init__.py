"""Methods of this family register themselves on import."""
from peftlab.methods.selective import bitfit  # noqa: F401
from peftlab.methods.selective import lnfit  # noqa: F401
from peftlab.methods.selective import freeze_layers  # noqa: F401
