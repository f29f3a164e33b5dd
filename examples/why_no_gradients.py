"""The three bugs of "Why aren't PyTorch gradients being calculated for my parameters?" under `check_step`.

Run: `python examples/why_no_gradients.py`. Each example is the article's snippet, unchanged, with its training
lines indented under `with check_step(model) as chk:`. Example 1 reports `weight: frozen`. Examples 2 and 3 build a
loss without a graph: `loss.backward()` raises `GradGuardError` instead of torch's "element 0 of tensors does not
require grad", naming the parameters that were cut (`weight, bias: detached`) and the line that cut them.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.optim as optim  # noqa: E402

from lightning_gradguard import GradGuardError, check_step  # noqa: E402


def example1() -> check_step:
    # Incorrectly set requires_grad=False during parameter initialization
    model = nn.Linear(10, 1)
    model.weight.requires_grad = False  # This prevents gradient calculation for weights

    with check_step(model) as chk:
        input_tensor = torch.randn(1, 10)
        output = model(input_tensor)
        loss = torch.nn.MSELoss()(output, torch.randn(1))  # Example loss calculation

        optimizer = optim.SGD(model.parameters(), lr=0.01)
        optimizer.zero_grad()
        loss.backward()

        # Attempting to update the weights will fail because gradients are not computed.
        optimizer.step()
    return chk


def example2() -> check_step:
    model = nn.Linear(10, 1)
    with check_step(model) as chk:
        input_tensor = torch.randn(1, 10)

        # Detaching the tensor disconnects it from the computational graph
        detached_output = model(input_tensor).detach()  # BUG: example 2
        loss = torch.nn.MSELoss()(detached_output, torch.randn(1))

        optimizer = optim.SGD(model.parameters(), lr=0.01)
        optimizer.zero_grad()
        loss.backward()
    return chk


def example3() -> check_step:
    model = nn.Linear(10, 1)
    with check_step(model) as chk:
        input_tensor = torch.randn(1, 10)
        target = torch.randn(1)

        output = model(input_tensor)

        # Incorrect Loss Function application, gradients might be calculated but wrong.
        loss = torch.nn.MSELoss()(output.data, target)  # BUG: example 3

        optimizer = optim.SGD(model.parameters(), lr=0.01)
        optimizer.zero_grad()
        loss.backward()
    return chk


def main() -> None:
    warnings.simplefilter("ignore")  # the article's MSELoss calls broadcast; GradGuard's own output is printed below
    for n, example in enumerate((example1, example2, example3), 1):
        print(f"--- example {n}")
        try:
            chk = example()
        except GradGuardError as err:
            print(f"GradGuardError: {err}")
            continue
        for f in chk.findings:
            print(f"{f.param}: {f.kind}: {f.message}")


if __name__ == "__main__":
    main()
