"""companion.decode with a compiled step: the tokens of the eager loop, for all three families.

The compiled step runs :class:`companion.layers.Linear`'s multiply-and-sum path on the CPU,
so these tests check that path inside whole models, with biases (Phi) and with the rolling
cache past the end of Mistral's window.
"""

import pytest
import torch

from companion.decode import compile_step, decode
from companion.device import plan_device
from companion.llama import Llama, LlamaConfig
from companion.mistral import Mistral, MistralConfig
from companion.phi import Phi, PhiConfig

# torch.compile runs where the device's plan says it can (on a CPU: a C++ compiler and a
# vector instruction set for Inductor; not with ATEN_CPU_CAPABILITY=default).
CPU_PLAN = plan_device("cpu", verbose=False)
needs_compile = pytest.mark.skipif(not CPU_PLAN.compile, reason="; ".join(CPU_PLAN.reasons))

WINDOW = 8
MODELS = {
    "llama": lambda: Llama(LlamaConfig.preset("tiny", num_key_value_heads=2)),
    "mistral": lambda: Mistral(MistralConfig.preset("tiny", sliding_window=WINDOW)),
    "phi": lambda: Phi(PhiConfig.preset("tiny")),
}


def random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms away from 1, random biases: varied tokens
            p.normal_(1.0, 0.2) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.1)
    return model


@needs_compile
@pytest.mark.parametrize("name", MODELS)
def test_compiled_step_gives_the_eager_tokens(name):
    model = random_model(name)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    n = 3 * WINDOW  # past the end of Mistral's window
    eager = decode(model, prompt, n)
    step = compile_step(model)
    assert torch.equal(decode(model, prompt, n, step=step), eager)
    assert torch.equal(decode(model, prompt, n, step=step), eager)  # the cache is reset and reused
    assert len(set(eager[0, 5:].tolist())) > 3  # not a degenerate run of one token


@needs_compile
def test_compiled_step_logits_match_the_eager_step():
    model = random_model("llama")
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    step = compile_step(model)
    with torch.no_grad():
        model.setup_cache(1, 8)
        model(prompt, start_pos=0)
        compiled = step(prompt[:, :1], torch.tensor(6))
        model.setup_cache(1, 8)
        model(prompt, start_pos=0)
        eager = model(prompt[:, :1], start_pos=6, last_only=True)
    assert torch.allclose(compiled, eager, atol=1e-5)
