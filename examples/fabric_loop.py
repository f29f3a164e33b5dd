"""A Lightning Fabric training loop guarded by ``check_fabric_step``, with a bug planted on purpose.

Run from the repository root::

    python examples/fabric_loop.py                 # bf16-mixed, the encoder's output `.detach()`-ed: raises
    python examples/fabric_loop.py --bug none      # the same loop without the bug: every step is silent
    python examples/fabric_loop.py --bug unused    # the `aux` head is never called: raises `unused`

Each iteration runs inside ``with check_fabric_step(fabric, model, optimizer, strict=True, step=step):``. The guard
checks the module inside Fabric's wrapper (findings carry your parameter names), sees ``fabric.backward(loss)`` and
judges the optimizer's parameters just before ``optimizer.step()``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

try:
    import lightning_gradguard
except ImportError:  # running from a checkout that was not pip-installed: use the package next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_gradguard

from lightning.fabric import Fabric

from lightning_gradguard.fabric import check_fabric_step

BUGS = ("none", "detach", "unused")


class Classifier(nn.Module):
    """``encoder`` -> ``head``, plus an auxiliary regression head ``aux``."""

    def __init__(self, bug: str = "detach") -> None:
        super().__init__()
        self.bug = bug
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)
        self.aux = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.bug == "detach":
            h = h.detach()  # BUG: detach
        aux = torch.zeros(x.shape[0], 1) if self.bug == "unused" else self.aux(h)  # BUG: unused
        return self.head(h), aux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", choices=BUGS, default="detach")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="bf16-mixed")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1, precision=args.precision)
    model = Classifier(args.bug)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    try:
        for step in range(args.steps):
            with check_fabric_step(fabric, model, optimizer, strict=True, step=step):
                optimizer.zero_grad()
                logits, aux = model(x)
                loss = F.cross_entropy(logits.float(), y) + 0.1 * aux.float().pow(2).mean()
                fabric.backward(loss)
                optimizer.step()
    except lightning_gradguard.GradGuardError as err:
        print(f"GradGuardError: {err}")
        return 1
    print(f"{args.steps} steps, every parameter got a usable gradient.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
