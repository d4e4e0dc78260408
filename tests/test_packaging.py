"""The installable package: its name, the core's single dependency, the ``loft`` script's
message without the application extra. (scripts/check_wheel.sh checks a built wheel in fresh
virtual environments; these are the fast checks on the development install.)"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import loft.app.command


def test_distribution_name_and_console_script():
    dist = metadata.distribution("torch-loft")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"loft": "loft.app.command:main"}
    extras = set(dist.metadata.get_all("Provides-Extra") or [])
    assert {"peft", "app", "test", "all"} <= extras
    core = [r for r in dist.requires if "extra ==" not in r]
    assert len(core) == 1 and core[0].startswith("torch"), core  # torch is the core's only dependency


def test_core_imports_with_torch_alone():
    """``import loft`` and a LoFT step work when transformers, peft, accelerate and typer cannot
    be imported (blocked in a fresh interpreter)."""
    code = (
        "import sys\n"
        "for m in ('transformers', 'peft', 'accelerate', 'typer', 'matplotlib', 'safetensors'):\n"
        "    sys.modules[m] = None\n"
        "import torch, loft\n"
        "A = torch.nn.Parameter(torch.randn(2, 5)); B = torch.nn.Parameter(torch.randn(4, 2))\n"
        "opt = loft.LoFTAdamW([loft.LoRAPair(A, B, 1.0)], lr=1e-2)\n"
        "(B @ A).square().sum().backward(); opt.step()\n"
        "try:\n"
        "    import loft.integrations\n"
        "except ModuleNotFoundError as e:\n"
        "    assert \"torch-loft[peft]\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('loft.integrations imported without transformers')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_console_script_names_the_missing_extra(monkeypatch, capsys):
    real = loft.app.command.find_spec
    monkeypatch.setattr(loft.app.command, "find_spec", lambda name: None if name in ("typer", "peft") else real(name))
    assert loft.app.command.main(["finetune"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loft: error:") and "typer, peft" in err and "pip install 'torch-loft[app]'" in err
    assert "Traceback" not in err


def test_the_loft_script_prints_no_bitsandbytes_kernel_hint():
    """With bitsandbytes installed (the QLoRA tests need it), importing peft may log a hint about
    an optional CPU kernel download; the loft script keeps it off the terminal."""
    code = "from loft.app.command import main\nassert main(['models']) == 0\nimport peft, transformers\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr and "gemm_4bit" not in out.stderr
