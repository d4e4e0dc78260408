"""A user's first minutes with an installed torch-loft wheel (run by scripts/check_wheel.sh).

    python scripts/wheel_smoke.py core   # `pip install torch-loft`: torch only
    python scripts/wheel_smoke.py all    # `pip install 'torch-loft[all]'`
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch
from torch import nn

import loft

mode = sys.argv[1]
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(loft.__file__).resolve().is_relative_to(site), f"loft imported from {loft.__file__}, not the wheel"
heavy = [m for m in ("transformers", "peft", "accelerate", "typer", "matplotlib") if m in sys.modules]
assert not heavy, f"import loft pulled in {heavy}: the core must need torch only"

# a home-made LoRA pair trained by LoFT: the loss falls and the state survives a round trip
torch.manual_seed(0)
x, y = torch.randn(64, 8), torch.randn(64, 6)
w0 = torch.randn(6, 8)
A, B = nn.Parameter(torch.randn(2, 8) / 8**0.5), nn.Parameter(torch.zeros(6, 2))
opt = loft.LoFTAdamW([loft.LoRAPair(A, B, scaling=1.0)], lr=1e-2, max_grad_norm=1.0)
losses = []
for _ in range(20):
    opt.zero_grad()
    loss = (x @ (w0 + B @ A).T - y).square().mean()
    loss.backward()
    opt.step()
    losses.append(loss.item())
assert losses[-1] < 0.9 * losses[0], losses
twin = loft.LoFTAdamW([loft.LoRAPair(A, B, scaling=1.0)], lr=1e-2, max_grad_norm=1.0)
twin.load_state_dict(opt.state_dict())

if mode == "core":
    try:
        import loft.integrations  # noqa: F401
    except ModuleNotFoundError as e:
        assert "torch-loft[peft]" in str(e), e
    else:
        raise AssertionError("loft.integrations imported without transformers installed")
else:
    import loft.integrations  # noqa: F401
    from loft.app.data import BUILTIN_DATASETS  # noqa: F401  (the vendored data ships in the wheel)

print(f"wheel smoke ({mode}): OK, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
