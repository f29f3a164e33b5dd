"""Demo: a tiny classifier with one classic "why are my gradients not computed?" bug planted on purpose.

Run from the repository root::

    python examples/train.py fit --config configs/demo.yaml
    python examples/train.py fit --config configs/demo.yaml --model.bug=frozen
    python examples/train.py fit --config configs/lenient.yaml --model.bug=unused

Each bug sits on one line marked ``# BUG: <name>``. ``GradGuard`` (configured under ``trainer.callbacks`` in the
YAML) reports the parameters it cuts off and, where it can, that line. After ``fit`` this script prints the findings.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning_gradguard
except ImportError:  # running from a checkout that was not pip-installed: use the package next to examples/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lightning_gradguard

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

NUM_FEATURES = 16
NUM_CLASSES = 4

Bug = Literal["none", "frozen", "detach", "data", "numpy", "item", "no_grad", "argmax", "unused", "orphan", "stale"]


class DemoModel(LightningModule):
    """An MLP classifier (``encoder`` -> ``head``) with an auxiliary regression term (``aux``).

    Args:
        bug: Which gradient bug to plant (each on a line marked ``# BUG: <name>``):
            none: no bug, every parameter gets a gradient.
            frozen: ``encoder.0.weight.requires_grad_(False)`` but the weight is still handed to the optimizer.
            detach: ``self.encoder(x).detach()`` cuts the encoder off the loss.
            data: ``self.encoder(x).data`` cuts the encoder off the loss (like ``.detach()``, but silently).
            numpy: a round trip through ``.detach().numpy()`` and ``torch.from_numpy`` cuts the encoder off.
            item: the auxiliary loss is re-wrapped with ``torch.tensor(t.item())``, so ``aux`` gets no gradient.
            no_grad: the encoder runs under ``torch.no_grad()``, so no graph is recorded for it.
            argmax: the encoder output goes through ``argmax`` (piecewise constant: no gradient flows back).
            unused: ``aux`` is never called, its parameters take no part in the loss.
            orphan: ``head`` is left out of the optimizer, its gradients pile up and are never applied.
            stale: the optimizer is built over the parameters of ``copy.deepcopy(self)``, not of the trained module.
        hidden: Width of the hidden layer.
        lr: Learning rate of the Adam optimizer.
    """

    def __init__(self, bug: Bug = "detach", hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.bug = bug
        self.lr = lr
        self.encoder = nn.Sequential(nn.Linear(NUM_FEATURES, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, NUM_CLASSES)
        self.aux = nn.Linear(hidden, 1)
        if bug == "frozen":
            self.encoder[0].weight.requires_grad_(False)  # BUG: frozen - frozen, yet configure_optimizers hands it over

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.bug == "detach":
            h = self.encoder(x).detach()  # BUG: detach - no gradient flows back into the encoder
        elif self.bug == "data":
            h = self.encoder(x).data  # BUG: data - `.data` is a detached view, the encoder gets no gradient
        elif self.bug == "numpy":
            h = torch.from_numpy(self.encoder(x).detach().numpy())  # BUG: numpy - numpy arrays carry no graph
        elif self.bug == "no_grad":
            with torch.no_grad():  # BUG: no_grad - nothing computed in this block is recorded for backward
                h = self.encoder(x)
        elif self.bug == "argmax":
            h = F.one_hot(self.encoder(x).argmax(dim=1), self.hparams.hidden).float()  # BUG: argmax - no gradient
        else:
            h = self.encoder(x)

        logits = self.head(h)
        if self.bug == "unused":
            aux_loss = torch.zeros((), device=x.device)  # BUG: unused - self.aux is never called
        elif self.bug == "item":
            aux_loss = torch.tensor(self.aux(h).pow(2).mean().item())  # BUG: item - a Python float carries no graph
        else:
            aux_loss = self.aux(h).pow(2).mean()

        loss = F.cross_entropy(logits, y) + 0.01 * aux_loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.parameters())  # with bug="frozen" this still includes the frozen encoder weight
        if self.bug == "orphan":
            params = [p for n, p in self.named_parameters() if not n.startswith("head.")]  # BUG: orphan - no head
        elif self.bug == "stale":
            params = list(copy.deepcopy(self).parameters())  # BUG: stale - a copy's tensors, not the trained ones
        return torch.optim.Adam(params, lr=self.lr)


class DemoData(LightningDataModule):
    """Synthetic classification data: Gaussian features labelled by a fixed random linear map (no downloads).

    Args:
        batch_size: Samples per training batch.
        num_samples: Size of the training set.
        seed: Seed of the generator that makes features, labels and the shuffling order.
    """

    def __init__(self, batch_size: int = 32, num_samples: int = 512, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.seed = seed
        self.train_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.num_samples, NUM_FEATURES, generator=g)
        y = (x @ torch.randn(NUM_FEATURES, NUM_CLASSES, generator=g)).argmax(dim=1)
        self.train_set = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=g)


class DemoCLI(LightningCLI):
    """LightningCLI for the demo's model and data, that keeps a handle on itself: when ``fit`` raises,
    ``LightningCLI(...)`` never returns. ``gradguard check --cli examples/train.py`` runs ``main()``, which builds
    it."""

    last: DemoCLI | None = None

    def __init__(self, model_class: Any = DemoModel, datamodule_class: Any = DemoData, *args: Any, **kwargs: Any):
        super().__init__(model_class, datamodule_class, *args, **kwargs)

    def before_fit(self) -> None:
        DemoCLI.last = self


def print_findings(cli: LightningCLI | None) -> int:
    """Print every finding of every GradGuard callback of ``cli.trainer``; return how many there were."""
    guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, lightning_gradguard.GradGuard)] if cli else []
    findings = [f for guard in guards for f in guard.findings]
    print(f"== GradGuard findings ({len(guards)} guard(s)) ==")
    for f in findings:
        print(f"{f.kind:9} {f.param:30} {f.where or ''}")
        print(f"          {f.message}")
    print(f"== {len(findings)} finding(s) ==" if findings else "== no findings ==")
    return len(findings)


def main(args: list[str] | None = None) -> int:
    try:
        cli = DemoCLI(DemoModel, DemoData, save_config_kwargs={"overwrite": True}, run=True, args=args)
    except lightning_gradguard.GradGuardError as err:
        # The demo exists to show this error: a planted bug with an `on_*: raise` policy stops `fit` here.
        # Show it and the findings, and exit 0: the demo did its job.
        print(f"GradGuardError: {err}")
        print_findings(DemoCLI.last)
        print(
            "\nThis GradGuardError is the demo's point: the model plants a bug (--model.bug), and GradGuard stopped "
            "training at the first optimizer step instead of letting it run on. Try --model.bug=none for a clean "
            "run, or another bug (see examples/train.py)."
        )
        print_log_dir(DemoCLI.last)
        return 0
    if cli.subcommand == "fit":
        print_findings(cli)
        print_log_dir(cli)
    return 0


def print_log_dir(cli: LightningCLI | None) -> None:
    """Say where the run's logs and GradGuard's JSON report went."""
    log_dir = cli.trainer.log_dir if cli is not None else None
    if log_dir:
        print(f"Logs and GradGuard's report (gradguard_report.json): {log_dir}")


if __name__ == "__main__":
    sys.exit(main())
