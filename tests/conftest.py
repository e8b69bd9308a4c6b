"""Settings every test process needs before a test module imports anything.

Triton decides when it is first imported whether its kernels are compiled for a GPU or run
by its interpreter on NumPy (``TRITON_INTERPRET=1``). ``transformers`` and ``torchao``
import Triton, and several test modules import those at collection, so the choice is made
here, first: on a machine without a GPU, the kernels of ``companion.flash_triton`` run in
the interpreter, which is how the tests check them on a CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
