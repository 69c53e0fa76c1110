"""Memory accounting for SGD-SaI against AdamW and SGD-momentum under every sharding.

:mod:`~sai_dist.memory.models` builds real architectures on the meta device,
:mod:`~sai_dist.memory.accounting` turns their parameter shapes into per-rank bytes,
:mod:`~sai_dist.memory.parallel` does so per pipeline stage under tensor x pipeline x FSDP2,
:mod:`~sai_dist.memory.plan` estimates activations and checks a per-device budget, and
:mod:`~sai_dist.memory.cli` is ``sai-dist memory``.
"""

from sai_dist.memory.accounting import (
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    RankMemory,
    buffer_elements,
    rank_memory,
)
from sai_dist.memory.models import PRESETS, ModelSpec, build_model, resolve_model

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "PRESETS",
    "STRATEGIES",
    "ModelSpec",
    "RankMemory",
    "buffer_elements",
    "build_model",
    "rank_memory",
    "resolve_model",
]
