"""Bad input gets a clear error that names what was found and what to do."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_linear
from torch import nn

import loft

peft = pytest.importorskip("peft")


def test_model_without_lora_layers():
    with pytest.raises(ValueError, match=r"No LoRA layers found in Sequential.*get_peft_model"):
        loft.LoFTAdamW(nn.Sequential(nn.Linear(4, 4)))


def test_model_whose_adapters_are_all_frozen():
    model, _ = lora_linear(4, 4, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"1 LoRA layer\(s\) but none with trainable factors"):
        loft.LoFTAdamW(model)


def test_parameters_instead_of_the_model():
    model, _ = lora_linear(4, 4, 2)
    with pytest.raises(ValueError, match=r"Pass the model itself, LoFTAdamW\(model\), not\s+model.parameters\(\)"):
        loft.LoFTAdamW(model.parameters())
    with pytest.raises(ValueError, match=r"Pass the model itself"):
        loft.LoFTAdamW([{"params": list(model.parameters()), "lr": 1e-3}])


def test_explicit_pair_with_no_trainable_factor():
    # one frozen factor is allowed (LoFT moves the other: tests/test_federated.py); none is not
    a = torch.zeros(2, 4, dtype=torch.float64)
    b = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mine: neither factor is trainable"):
        loft.LoRAPair(a, b, 1.0, name="mine")


def test_sparse_gradients():
    class WithSparseEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4, sparse=True)
            self.proj = nn.Linear(4, 4)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    model = peft.get_peft_model(WithSparseEmbedding(), peft.LoraConfig(r=2, target_modules=["proj"]))
    model.base_model.model.emb.weight.requires_grad_(True)
    opt = loft.LoFTAdamW(model)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(.*emb.weight\).*sparse=False"):
        opt.step()


def test_unknown_options_suggest_the_right_name():
    model, _ = lora_linear(4, 4, 2)
    with pytest.raises(TypeError, match=r"unknown option 'max_grad_nrom'. Did you mean 'max_grad_norm'\?"):
        loft.LoFTAdamW(model, max_grad_nrom=1.0)
    with pytest.raises(TypeError, match=r"unknown option 'foo'\. Options: lr, betas"):
        loft.LoFTAdamW(model, foo=1)
    with pytest.raises(ValueError, match=r"unknown option 'weight_decy'. Did you mean 'weight_decay'"):
        loft.LoFTAdamW([{"params": [model], "weight_decy": 0.1}])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"betas": (0.9, 1.0)}, "Invalid betas"),
        ({"eps": -1e-8}, "Invalid eps"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
        ({"max_grad_norm": 0.0}, "Invalid max_grad_norm"),
        ({"nonfinite_grads": "ignore"}, "Invalid nonfinite_grads: 'ignore'"),
        ({"head_lr": -1.0}, "Invalid head_lr"),
    ],
)
def test_invalid_option_values(kwargs, message):
    model, _ = lora_linear(4, 4, 2)
    with pytest.raises(ValueError, match=message):
        loft.LoFTAdamW(model, **kwargs)


def test_explicit_pairs_are_checked():
    A = nn.Parameter(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"B must be \(out_features, 2\)"):
        loft.LoRAPair(A, nn.Parameter(torch.randn(4, 3)), 1.0)
    with pytest.raises(ValueError, match=r"scaling 0.0; LoFT needs a finite, non-zero scaling"):
        loft.LoRAPair(A, nn.Parameter(torch.zeros(4, 2)), 0.0)
    with pytest.raises(TypeError, match="must be modules, loft.LoRAPair objects or tensors, got str"):
        loft.LoFTAdamW(["not a tensor"])


def test_checkpoint_of_a_different_rank_is_refused():
    model, layer = lora_linear(6, 5, 2)
    opt = loft.LoFTAdamW(model)
    model(torch.randn(3, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    other, _ = lora_linear(6, 5, 3)
    opt_other = loft.LoFTAdamW(other)
    with pytest.raises(ValueError, match=r"different LoRA rank"):
        opt_other.load_state_dict(opt.state_dict())


def test_explicit_pairs_for_a_home_made_lora_module():
    """People with their own LoRA modules hand over (A, B, scaling) themselves."""

    class MyLoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(5, 6).requires_grad_(False)
            self.down = nn.Parameter(torch.randn(2, 5) * 0.1)
            self.up = nn.Parameter(torch.zeros(6, 2))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.base(x) + 0.5 * x @ self.down.T @ self.up.T)

    net = MyLoRA()
    opt = loft.LoFTAdamW([loft.LoRAPair(net.down, net.up, 0.5, name="mine"), *net.head.parameters()], lr=1e-2)
    assert [p.name for p in opt.pairs] == ["mine"]
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 5)).square().mean().backward()
        opt.step()
    assert float(net.up.abs().max()) > 0 and opt.state[net.down]["step"] == 3


# ----------------------------------------------------------------------------- reliability (#11 item 7)
def _model_with_head(labels: int):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, labels))
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))


def _train(model, opt, steps: int = 2):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()


def test_checkpoint_with_a_head_of_another_shape_is_refused_at_load():
    model = _model_with_head(3)
    opt = loft.LoFTAdamW(model, lr=1e-2)
    _train(model, opt)
    other = _model_with_head(5)
    opt_other = loft.LoFTAdamW(other, lr=1e-2)
    with pytest.raises(ValueError, match=r"modules_to_save.*weight.*shape \(3, 8\).*shape \(5, 8\).*different model"):
        opt_other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("lr", ["abc", None, [1e-3]])
def test_learning_rate_that_is_not_a_number(lr):
    model, _ = lora_linear(4, 4, 2)
    with pytest.raises(TypeError, match=r"Invalid lr: .* it must be a number"):
        loft.LoFTAdamW(model, lr=lr)


def test_tensor_options_are_refused_with_the_conversion_to_use():
    model, _ = lora_linear(4, 4, 2)
    with pytest.raises(TypeError, match=r"Invalid lr: a tensor .*lr=float\(value\)"):
        loft.LoFTAdamW(model, lr=torch.tensor(1e-3))
    with pytest.raises(TypeError, match=r"Invalid weight_decay"):
        loft.LoFTAdamW([{"params": [model], "weight_decay": "0.1"}])


def test_clip_grad_norm_given_parameters_says_to_pass_the_optimizer():
    model, _ = lora_linear(4, 4, 2)
    with pytest.raises(TypeError, match=r"takes the LoFTAdamW optimizer, not generator.*clip_grad_norm_\(optimizer"):
        loft.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(TypeError, match=r"takes the LoFTAdamW optimizer, not list"):
        loft.clip_grad_norm_(list(model.parameters()), 1.0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("factor", ["A", "B"])
def test_clip_grad_norm_with_nonfinite_gradients_returns_what_torch_returns(bad, factor):
    model = _model_with_head(3)
    opt = loft.LoFTAdamW(model, lr=1e-2)
    _train(model, opt, 1)
    opt.zero_grad()
    model(torch.randn(4, 6)).square().mean().backward()
    (pair,) = opt.pairs
    getattr(pair, factor).grad[0, 1] = bad
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.nn.utils.get_total_norm([p.grad for p in params])
    got = loft.clip_grad_norm_(opt, 1.0)
    assert got.isinf() == expected.isinf() and got.isnan() == expected.isnan()
    assert not bool(torch.isfinite(got))
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):
        loft.clip_grad_norm_(opt, 1.0, error_if_nonfinite=True)
