"""companion: the tested package behind *Transformers from scratch*.

Every chapter of the book imports one module of this package and shows, in an
executed cell, that the code written inline in the chapter equals the code here.
"""

from companion.device import pick_device, plan_device, seed_everything

__version__ = "0.1.0"

__all__ = ["pick_device", "plan_device", "seed_everything", "__version__"]
