"""What the compiled steps need beyond `batchlab.optim`: their refusal, and a torch optimizer read as a chain.

torch.optim reads its learning rate as a Python number, so a compiled graph would bake it in and
recompile whenever a schedule changes it. The compiled steps apply a `batchlab.optim.Chain` instead
(torch.optim's single-tensor algorithms as transforms over explicit state), with the learning rate
a tensor input. For one model the state is kept in torch.optim's own format, inside the
optimizer's ``state``, so a run may switch between a compiled step and ``optimizer.step()`` at any
step, and checkpoints written from ``optimizer.state_dict()`` hold everything.
"""

from __future__ import annotations

import torch

from ..errors import BatchlabError
from ..optim.chains import UnsupportedOptimizer, chain_of, torch_state
from ..optim.transforms import Chain, State


class CompileUnsupported(BatchlabError):
    """The step cannot be compiled (an optimizer option or a model the compiler cannot capture)."""


def optimizer_as_chain(optimizer: torch.optim.Optimizer) -> tuple[Chain, State]:
    """A torch optimizer's chain and its state, created in ``optimizer.state`` as torch.optim would.

    Raises:
        CompileUnsupported: an optimizer or option no chain reproduces (`batchlab.optim.chain_of`),
            or one whose state cannot be shared with ``optimizer.step()``; the message names it.
    """
    try:
        chain = chain_of(optimizer)
        return chain, torch_state(optimizer, chain)
    except UnsupportedOptimizer as error:
        raise CompileUnsupported(str(error)) from None
