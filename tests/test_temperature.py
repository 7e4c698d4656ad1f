"""The learnable temperature: its value, its gradient through a loss, its bounds and its state."""

import math

import pytest
import torch

from mmalign.losses import info_nce, mms_loss
from mmalign.models.temperature import LearnableTemperature


def test_initial_value_and_state_round_trip():
    temp = LearnableTemperature(0.07)
    assert abs(temp().item() - 0.07) < 1e-6 and temp().dtype == torch.float32 and temp().dim() == 0
    other = LearnableTemperature(0.5)
    other.load_state_dict(temp.state_dict())
    assert other().item() == temp().item()


def test_gradient_through_info_nce_matches_the_chain_rule():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    temp = LearnableTemperature(0.2)
    loss = info_nce(a, b, temperature=temp())
    loss.backward()
    # d loss / d s = d loss / d tau * d tau / d s = d loss / d tau * (-tau)
    tau = torch.tensor(0.2, requires_grad=True)
    info_nce(a, b, temperature=tau).backward()
    assert abs(float(temp.log_scale.grad) - float(tau.grad) * -0.2) < 1e-5
    assert float(temp.log_scale.grad) != 0


def test_training_moves_the_temperature_and_the_clamp_holds():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 8, generator=g)
    temp = LearnableTemperature(0.5, max_scale=4.0)  # tau >= 0.25
    opt = torch.optim.SGD(temp.parameters(), lr=5.0)
    for _ in range(50):  # perfectly aligned pairs: a lower temperature always lowers the loss
        opt.zero_grad()
        mms_loss(a, a, temperature=temp(), margin=0.0).backward()
        opt.step()
    assert abs(temp().item() - 0.25) < 1e-6  # pushed to the bound, and held there
    # each call projects the raw parameter back onto the bound (CLIP's in-place clamp), so it never drifts past
    assert temp.log_scale.item() == pytest.approx(math.log(4.0), abs=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(init=0), "init must be > 0"), (dict(init=float("nan")), "init must be finite"),
    (dict(init=0.001), "outside"), (dict(min_scale=10, max_scale=5), "must not exceed"),
    (dict(max_scale=-1), "max_scale must be > 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnableTemperature(**kwargs)
