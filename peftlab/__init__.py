"""peftlab: parameter-efficient fine-tuning for any PyTorch model.

    import peftlab
    pm = peftlab.apply(model, "lora[r=8,alpha=16,targets=q_proj|v_proj]")
    pm.save("out"); pm = peftlab.load(fresh_model, "out")
"""

from peftlab import zoo
from peftlab.core.config import AdapterConfig, ConfigError, UnionConfig, parse_method_string
from peftlab.core.io import AdapterFileError
from peftlab.core.model import NotForwardedError, PeftModel, apply, load
from peftlab.core.optim import param_groups
from peftlab.core.registry import NotApplicableError, get_method, list_methods, register_method
from peftlab.core.targeting import TargetError

# Importing the methods registers every built-in method (the core itself never imports them).
from peftlab import methods  # noqa: E402,F401  isort: skip
from peftlab.methods.reparam.lora import DoraConfig, LoraConfig, LoraFaConfig  # noqa: E402  isort: skip
# The quantized base: registers the ``qlora[...]`` form (bitsandbytes is imported only when used).
from peftlab import quant  # noqa: E402,F401  isort: skip
from peftlab.compose import Average, Parallel, Stack  # noqa: E402  isort: skip

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterFileError",
    "Average",
    "ConfigError",
    "DoraConfig",
    "LoraConfig",
    "LoraFaConfig",
    "NotApplicableError",
    "NotForwardedError",
    "Parallel",
    "PeftModel",
    "Stack",
    "TargetError",
    "UnionConfig",
    "apply",
    "get_method",
    "list_methods",
    "load",
    "param_groups",
    "parse_method_string",
    "register_method",
    "zoo",
]
