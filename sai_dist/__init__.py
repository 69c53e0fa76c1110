"""sai_dist: SGD-SaI (arXiv 2412.11768), exact and cheap under every common sharding.

``SGDSaI`` is a drop-in ``torch.optim.Optimizer``; ``gsnr_table`` reports the per-parameter
g-SNR and scale it fixed at step 1.
"""

from sai_dist.functional import sgd_sai
from sai_dist.optimizer import SGDSaI
from sai_dist.table import format_table, gsnr_table
from sai_dist.warning_categories import SGDSaIWarning
from sai_dist.whole_model import link_parts

__version__ = "0.1.0"

__all__ = ["SGDSaI", "SGDSaIWarning", "__version__", "format_table", "gsnr_table", "link_parts", "sgd_sai"]
