"""Methods of this family register themselves on import."""
from peftlab.methods.additive import prefix  # noqa: F401
from peftlab.methods.additive import houlsby, ia3  # noqa: F401
from peftlab.methods.additive import compacter, par_adapter, pfeiffer  # noqa: F401
from peftlab.methods.additive import prompt  # noqa: F401
from peftlab.methods.additive import ptuning  # noqa: F401
from peftlab.methods.additive import ptuning_v2  # noqa: F401
from peftlab.methods.additive import llama_adapter  # noqa: F401
