"""An independent, deliberately plain reference of SGD-SaI for the tests.

It follows the issue's algorithm line by line with ``torch.std`` and ``torch.linalg.norm``
on whole tensors, one parameter at a time, and shares no code with ``sai_dist``.
"""

from __future__ import annotations

import torch


class ReferenceSGDSaI:
    def __init__(self, groups, *, normalize=True, degenerate="max"):
        # groups: list of dicts with params, lr, momentum, weight_decay, eps, maximize
        self.groups = groups
        self.normalize = normalize
        self.degenerate = degenerate
        self.scale = {}
        self.gsnr = {}
        self.buf = {}
        self.gmax = None

    def _gsnr(self, g, eps):
        std = torch.std(g).nan_to_num() if g.numel() > 1 else torch.tensor(0.0)
        return (torch.linalg.norm(g.double()) / (std.double() + eps)).item(), std.item() == 0.0

    @torch.no_grad()
    def step(self):
        if self.gmax is None:
            raw = {}
            for grp in self.groups:
                for p in grp["params"]:
                    if p.grad is not None:
                        raw[p] = self._gsnr(p.grad.double(), grp["eps"])
            if self.degenerate == "max":
                regular = [v for v, deg in raw.values() if not deg]
                fill = max(regular) if regular else 1.0
                values = {p: (fill if deg else v) for p, (v, deg) in raw.items()}
            else:
                values = {p: v for p, (v, _) in raw.items()}
            self.gmax = max(values.values())
            self.divisor = self.gmax if self.normalize and self.gmax > 0 else 1.0
            for p, v in values.items():
                self.gsnr[p] = v
                self.scale[p] = v / self.divisor
        for grp in self.groups:
            for p in grp["params"]:
                if p.grad is None:
                    continue
                if p not in self.scale:  # late block
                    v, deg = self._gsnr(p.grad.double(), grp["eps"])
                    if deg and self.degenerate == "max":
                        v = self.gmax
                    self.gsnr[p] = v
                    self.scale[p] = v / self.divisor
                g = -p.grad if grp["maximize"] else p.grad
                if grp["momentum"] != 0:
                    if p not in self.buf:
                        self.buf[p] = g.clone()
                    else:
                        self.buf[p] = grp["momentum"] * self.buf[p] + (1 - grp["momentum"]) * g
                    m = self.buf[p]
                else:
                    m = g
                p.mul_(1 - grp["lr"] * grp["weight_decay"])
                p.sub_(grp["lr"] * float(torch.tensor(self.scale[p], dtype=torch.float32)) * m)
