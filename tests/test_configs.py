"""Every method's config rejects bad values with an error naming the field (one table)."""

import math

import pytest
import torch

from benchmarks.backbones import LateFusionModel
from casp import CASP, CASPConfig
from cggm import CGGM, CGGMConfig
from mmcore import ModalityBatch
from wander import Wander, WanderConfig

BAD = [
    # wander
    (WanderConfig, {"bottleneck_dim": 0}, "bottleneck_dim must be a positive integer"),
    (WanderConfig, {"feature_rank": True}, "feature_rank must be a positive integer"),
    (WanderConfig, {"token_rank": 2.0}, "token_rank must be a positive integer"),
    (WanderConfig, {"num_fused_tokens": 0}, "num_fused_tokens must be a positive integer or None"),
    (WanderConfig, {"fused_dim": True}, "fused_dim must be a positive integer or None"),
    (WanderConfig, {"out_dim": -3}, "out_dim must be a positive integer or None"),
    (WanderConfig, {"cp_mode": "rank1"}, "cp_mode must be one of"),
    (WanderConfig, {"init": "zeros"}, "init must be one of"),
    (WanderConfig, {"output": "sum"}, "output must be one of"),
    (WanderConfig, {"interaction_init": -0.1}, "interaction_init must be >= 0"),
    (WanderConfig, {"interaction_init": math.nan}, "interaction_init must be >= 0"),
    (WanderConfig, {"output_scale": 0.0}, "output_scale must be > 0"),
    (WanderConfig, {"stack_parameters": "yes"}, "stack_parameters must be True or False"),
    (WanderConfig, {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    (WanderConfig, {"dropout": math.nan}, r"dropout must be in \[0, 1\)"),
    (WanderConfig, {"target_modules": {"text": "enc"}}, "at least 2 modality names"),
    # cggm
    (CGGMConfig, {"task": "ranking"}, "task must be one of"),
    (CGGMConfig, {"mode": "paper"}, "mode must be one of"),
    (CGGMConfig, {"regression_score": "mse"}, "regression_score must be one of"),
    (CGGMConfig, {"num_outputs": 0}, "num_outputs must be a positive integer"),
    (CGGMConfig, {"num_outputs": True}, "num_outputs must be a positive integer"),
    (CGGMConfig, {"rho": 0.0}, "rho must be > 0 or None"),
    (CGGMConfig, {"rho": math.nan}, "rho must be > 0 or None"),
    (CGGMConfig, {"lam": -0.1}, "lam must be >= 0"),
    (CGGMConfig, {"lam": math.nan}, "lam must be >= 0"),
    (CGGMConfig, {"cls_lr": 0.0}, "cls_lr must be > 0"),
    (CGGMConfig, {"smoothing": 1.0}, r"smoothing must be in \[0, 1\)"),
    (CGGMConfig, {"mode": "reference", "smoothing": 0.5}, "default-mode safeguard"),
    (CGGMConfig, {"classifier_hidden": 0}, "classifier_hidden must be a positive integer"),
    (CGGMConfig, {"eps": 0.0}, "eps must be > 0"),
    # casp
    (CASPConfig, {"task": "ranking"}, "task must be one of"),
    (CASPConfig, {"keep": "stable"}, "keep must be one of"),
    (CASPConfig, {"select_by": "best"}, "select_by must be one of"),
    (CASPConfig, {"trainable": "heads"}, "trainable must be one of"),
    (CASPConfig, {"tau": 0.0}, "tau must be > 0"),
    (CASPConfig, {"epochs_ca": 0}, "epochs_ca must be a positive integer"),
    (CASPConfig, {"batch_size": 8.0}, "batch_size must be a positive integer"),
    (CASPConfig, {"snapshot_every": True}, "snapshot_every must be a positive integer"),
    (CASPConfig, {"epochs_pl": -1}, "epochs_pl must be an integer >= 0"),
    (CASPConfig, {"seed": 1.5}, "seed must be an integer"),
    (CASPConfig, {"keep_ratio": 0.0}, r"keep_ratio must be in \(0, 1\]"),
    (CASPConfig, {"keep_ratio": 1.5}, r"keep_ratio must be in \(0, 1\]"),
    (CASPConfig, {"epochs_ca": 2, "snapshot_every": 3}, "no snapshot"),
    (CASPConfig, {"lr": -1e-3}, "lr must be > 0"),
    (CASPConfig, {"clip": 0.0}, "clip must be > 0 or None"),
    (CASPConfig, {"collapse_threshold": math.nan}, "collapse_threshold must be >= 0"),
]


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    BAD,
    ids=[f"{c.__name__}-{'-'.join(map(str, k))}-{i}" for i, (c, k, _) in enumerate(BAD)],
)
def test_bad_value_raises_naming_the_field(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(**kwargs)


@pytest.mark.parametrize("config", [WanderConfig, CGGMConfig, CASPConfig])
def test_defaults_are_valid_and_round_trip_through_a_dict(config):
    default = config()
    assert config(**default.to_dict()) == default


def test_one_module_to_save_may_be_a_string():
    assert WanderConfig(modules_to_save="classifier").modules_to_save == ["classifier"]


def _late_fusion():
    batch = ModalityBatch({"a": torch.randn(4, 5), "b": torch.randn(4, 3, 2)}, torch.arange(4) % 2)
    return LateFusionModel.from_batch(batch, 2, width=6, hidden=8, num_heads=2, num_layers=1)


@pytest.mark.parametrize(
    ("method", "args", "misspelt", "meant"),
    [
        (CASP, (), "epoch_ca", "epochs_ca"),
        (CGGM, (), "rh", "rho"),
        (Wander, ((4, 2, 2),), "cp_mdoe", "cp_mode"),
        (Wander, (), "target_module", "target_modules"),
    ],
)
def test_a_misspelt_option_names_the_field_meant(method, args, misspelt, meant):
    with pytest.raises(TypeError, match=rf"unknown option '{misspelt}' \(did you mean '{meant}'"):
        method(_late_fusion(), *args, **{misspelt: 1})
