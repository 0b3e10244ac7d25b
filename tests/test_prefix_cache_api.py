"""Prefix tuning across transformers' rename of `past_key_values` to `cache` (methods/prompt.py): the shim maps
the old name to the new one on backbones that take `cache`, leaves older backbones alone, and survives a deep
copy. The end-to-end runs on whatever transformers is installed are in test_methods.py / test_method_runs.py."""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from methods.prompt import _accept_past_key_values


class _NewBackbone(nn.Module):  # transformers >= 5.24: the prefix comes in as `cache`
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, cache=None):
        return x * self.w + (0 if cache is None else cache)


class _OldBackbone(nn.Module):  # transformers <= 5.23
    def forward(self, x, past_key_values=None):
        return x + (0 if past_key_values is None else past_key_values)


class _Peft(nn.Module):  # the two attributes of a PeftModel the shim uses
    transformer_backbone_name = "bert"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.bert = backbone


def test_a_cache_backbone_takes_past_key_values_and_a_copy_uses_its_own_weights():
    model = _accept_past_key_values(_Peft(_NewBackbone()))
    bert = model.base_model.bert
    assert "past_key_values" in inspect.signature(bert.forward).parameters  # what peft 0.21 looks for
    assert bert(torch.tensor(1.0), past_key_values=torch.tensor(3.0)).item() == 5.0
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.base_model.bert.w.fill_(10.0)
    assert twin.base_model.bert(torch.tensor(1.0), past_key_values=torch.tensor(3.0)).item() == 13.0
    assert bert(torch.tensor(1.0), past_key_values=torch.tensor(3.0)).item() == 5.0


def test_an_old_backbone_is_left_as_it_is():
    backbone = _OldBackbone()
    _accept_past_key_values(_Peft(backbone))
    assert "forward" not in vars(backbone)
