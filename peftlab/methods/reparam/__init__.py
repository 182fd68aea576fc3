"""Reparameterized methods: they change W through a low-rank or structured ΔW."""

from peftlab.methods.reparam import lora  # noqa: F401
from peftlab.methods.reparam import boft, loha, lokr, oft  # noqa: F401
from peftlab.methods.reparam import dylora  # noqa: F401
from peftlab.methods.reparam import vera  # noqa: F401
from peftlab.methods.reparam import fourierft  # noqa: F401
from peftlab.methods.reparam import adalora  # noqa: F401
