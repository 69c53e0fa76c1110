"""The training job behind ``sai-dist train``: a small GPT on the standard library's source.

Modules: :mod:`~sai_dist.train.model` (the decoder), :mod:`~sai_dist.train.data` (the
offline byte corpus and its deterministic batches), :mod:`~sai_dist.train.distributed`
(launcher detection and process groups), :mod:`~sai_dist.train.backends` (wrapping and
optimizers), :mod:`~sai_dist.train.run_checkpoints`, :mod:`~sai_dist.train.loop` and
:mod:`~sai_dist.train.cli`.
"""
