"""Fine-tuning methods. Importing this package registers every family in ``METHODS``."""

from tunelab.methods import bottleneck, freeze, full, lora, prompts  # noqa: F401  (registration)
from tunelab.methods.base import METHODS, Method, get_method, register  # noqa: F401
