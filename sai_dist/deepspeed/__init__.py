r"""DeepSpeed integration: ``"type": "SGDSaI"`` in a DeepSpeed config, any ZeRO stage.

Two ways in, one mechanism:

* ``sai_dist.deepspeed.initialize(...)``: a drop-in for ``deepspeed.initialize`` (same
  arguments, same return value) that also sets the config switches SGD-SaI needs.
* Code that calls ``deepspeed.initialize`` itself (Hugging Face Trainer, Lightning, a
  training script you do not own): ``import sai_dist.deepspeed`` once before it. The
  import registers ``torch.optim.SGDSaI`` (DeepSpeed resolves an unknown optimizer
  ``type`` with ``getattr(torch.optim, type)``), adds SGD-SaI to ZeRO's list of supported
  optimizers, and hooks ``DeepSpeedEngine._configure_optimizer`` so that whichever wrapper
  DeepSpeed builds around an :class:`~sai_dist.SGDSaI` gets the matching layout.

What the hook attaches (see :mod:`sai_dist.layouts.zero` for the maps):

* a :class:`~sai_dist.layouts.flat_segment.FlatSegmentLayout` mapping the wrapper's flat fp32
  partitions onto the original parameters, so g-SNR is that of the model's parameters;
* for ZeRO-1/2/3, which call the client's ``step()`` once per param group / sub-group,
  a *first-step barrier*: until g-SNR is fixed, those calls are held back and the last
  one steps every group at once, so step 1 sees every block (the normaliser is the max
  over the whole model). Held-back groups are then copied back to the low-precision
  weights exactly as DeepSpeed does after a step. From step 2 on, calls pass straight
  through and issue no collective.

World-size-free checkpoints: :func:`save_optimizer_state` writes, per original
parameter, the fp32 master weight, the momentum buffer and the fixed g-SNR and scale;
:func:`load_optimizer_state` loads that into an engine of any world size and ZeRO stage.

The integration is one package, one module per concept:

* :mod:`~sai_dist.deepspeed.config`: the ``"optimizer"`` section (``check_config_params``)
  and the config ``initialize`` is given;
* :mod:`~sai_dist.deepspeed.engine`: the hooks ``install`` sets, ``attach``, ``initialize``;
* :mod:`~sai_dist.deepspeed.first_step`: ZeRO's first-step barrier;
* :mod:`~sai_dist.deepspeed.checkpoint`: the world-size-free optimizer checkpoint;
* :mod:`~sai_dist.deepspeed.shm`: DeepSpeed's CPU shared-memory workspace, released.

Every public name stays importable from ``sai_dist.deepspeed``.
"""

from __future__ import annotations

from sai_dist.deepspeed.checkpoint import CHECKPOINT_FORMAT, load_optimizer_state, save_optimizer_state
from sai_dist.deepspeed.config import OPTIMIZER_TYPE, check_config_params
from sai_dist.deepspeed.engine import attach, deepspeed_available, initialize, install
from sai_dist.deepspeed.shm import SHM_DIR, release_shm_workspace, shm_workspace_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "OPTIMIZER_TYPE",
    "SHM_DIR",
    "attach",
    "check_config_params",
    "initialize",
    "install",
    "load_optimizer_state",
    "release_shm_workspace",
    "save_optimizer_state",
    "shm_workspace_path",
]

# ``import sai_dist.deepspeed`` is the registration (see above): without DeepSpeed it is a no-op.
if deepspeed_available():
    install()
