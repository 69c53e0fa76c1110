"""The DeepSpeed config's side of SGD-SaI: the ``"optimizer": {"type": "SGDSaI", "params":
{...}}`` section checked before anything is built, and the config ``initialize`` is given
(a dict, a JSON path or ``args.deepspeed_config``) read into a dict of its own."""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
from typing import Any

import torch

from sai_dist.optimizer import SGDSaI

__all__ = ["OPTIMIZER_TYPE", "check_config_params", "load_config", "offloads_optimizer"]

#: The optimizer ``type`` DeepSpeed configs name SGD-SaI by.
OPTIMIZER_TYPE = "SGDSaI"

# Keyword arguments of SGDSaI a JSON config can set (params and layout are not JSON).
_CONFIG_KEYS = tuple(
    n for n in inspect.signature(SGDSaI.__init__).parameters if n not in ("self", "params", "layout")
)
# Keys other optimizers take in DeepSpeed configs, with what to use instead.
_CONFIG_HINTS = {
    "max_grad_norm": 'clip with DeepSpeed\'s top-level "gradient_clipping" instead',
    "betas": "Adam's betas have no counterpart: SGD-SaI has one momentum",
    "nesterov": "SGD-SaI does not implement Nesterov momentum",
}


def check_config_params(params: Any) -> None:
    """Validate the ``params`` of a DeepSpeed ``"optimizer": {"type": "SGDSaI", "params":
    {...}}`` section before anything is built.

    DeepSpeed passes ``params`` to ``SGDSaI(model_parameters, **params)``; an unknown key
    (a typo such as ``"momentun"``, or another optimizer's option) would surface as a bare
    ``TypeError`` from deep inside engine construction. Raises ``ValueError`` naming every
    unknown key (with the closest SGD-SaI key) or the invalid value, as SGDSaI itself does
    for its arguments. Pure: reads ``params``, builds nothing of the user's.
    """
    if params is None:
        return
    where = 'DeepSpeed config "optimizer": {"type": "SGDSaI", "params": ...}'
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a JSON object, got {type(params).__name__}")
    unknown = [k for k in params if k not in _CONFIG_KEYS]
    if unknown:
        notes = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), _CONFIG_KEYS, n=1, cutoff=0.6)
            hint = _CONFIG_HINTS.get(key) or (
                f"did you mean {close[0]!r}?" if close else "not an SGDSaI option"
            )
            notes.append(f"{key!r} ({hint})")
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(notes)}. SGDSaI accepts: {', '.join(_CONFIG_KEYS)}"
        )
    try:
        # Every value check SGDSaI makes, on a throwaway parameter.
        SGDSaI([torch.nn.Parameter(torch.zeros(1))], **params)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_config(config: Any, args: Any) -> tuple[dict[str, Any] | None, Any]:
    """The config as a dict (copied), and ``args`` stripped of ``deepspeed_config`` when
    the config came from there (DeepSpeed refuses a config given twice)."""
    if config is None and args is not None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    if config is None:
        return None, args
    if isinstance(config, str | os.PathLike):
        with open(config) as f:
            return json.load(f), args
    if isinstance(config, dict):
        return copy.deepcopy(config), args
    raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    off = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() not in ("none", "")
