"""The typed config: precedence, overrides, unknown keys, every validated bad value, batch arithmetic."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from rankclip_ds.config import (
    Config,
    ConfigError,
    config_to_dict,
    field_docs,
    load_config,
    parse_overrides,
    resolve_batch,
    save_config,
)


def write_yaml(tmp_path, data) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.optim.lr == 5e-4


def test_precedence_defaults_yaml_overrides(tmp_path):
    path = write_yaml(tmp_path, {"optim": {"lr": 1e-3, "weight_decay": 0.05}, "run": {"name": "from_yaml"}})
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.05 and cfg.run.name == "from_yaml"
    assert cfg.optim.eps == 1e-8  # default kept where the YAML is silent
    cfg = load_config(path, ["--optim.lr", "2e-3", "--run.name=from_cli"])
    assert cfg.optim.lr == 2e-3  # command line beats YAML
    assert cfg.optim.weight_decay == 0.05  # YAML beats default
    assert cfg.run.name == "from_cli"


def test_nested_override_keeps_sibling_yaml_values(tmp_path):
    path = write_yaml(tmp_path, {"model": {"image": {"name": "resnet18", "image_size": 64}}})
    cfg = load_config(path, ["--model.image.image_size", "96"])
    assert cfg.model.image.name == "resnet18" and cfg.model.image.image_size == 96


def test_override_value_types():
    cfg = load_config(
        None,
        [
            "--data.rrc_scale",
            "[0.5, 1.0]",
            "--optim.grad_clip",
            "null",
            "--loss.ranking",
            "false",
            "--loss.lambda_cross",
            "1",  # an int where a float is expected is accepted and converted
            "--model.image.model_kwargs",
            "{depth: 2}",
        ],
    )
    assert cfg.data.rrc_scale == (0.5, 1.0)
    assert cfg.optim.grad_clip is None
    assert cfg.loss.ranking is False
    assert isinstance(cfg.loss.lambda_cross, float)
    assert cfg.model.image.model_kwargs == {"depth": 2}


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "3", "--a.c=x", "--d.e.f", "[1, 2]"]) == {
        "a": {"b": 3, "c": "x"},
        "d": {"e": {"f": [1, 2]}},
    }
    with pytest.raises(ConfigError, match=r"--section\.key VALUE"):
        parse_overrides(["positional"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--optim.lr"])


@pytest.mark.parametrize(
    ("overrides", "key", "suggestion"),
    [
        (["--optim.learning_rate", "1"], "optim.learning_rate", "optim.lr"),
        (["--optm.lr", "1"], "optm", "optim"),
        (["--model.image.nam", "x"], "model.image.nam", "model.image.name"),
        (["--loss.lamda_in", "1"], "loss.lamda_in", "loss.lambda_in"),
    ],
)
def test_unknown_key_names_key_and_nearest(overrides, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert repr(key) in msg and "did you mean" in msg and suggestion in msg


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'shedule'.*did you mean schedule"):
        load_config(write_yaml(tmp_path, {"shedule": {"epochs": 3}}))


# Every bad value validated in __post_init__ (or by type coercion), with a fragment of its message.
BAD_VALUES = [
    (["--optim.lr", "0"], "optim.lr=0", "must be > 0"),
    (["--optim.lr", "-1e-4"], "optim.lr=-0.0001", "must be > 0"),
    (["--optim.lr", "abc"], "optim.lr='abc'", "must be a number"),
    (["--optim.micro_batch_size", "0"], "optim.micro_batch_size=0", "must be > 0"),
    (["--optim.micro_batch_size", "2.5"], "optim.micro_batch_size=2.5", "must be an integer"),
    (["--optim.micro_batch_size", "null"], "optim.micro_batch_size=None", "neither micro_batch_size"),
    (["--optim.grad_accum_steps", "0"], "optim.grad_accum_steps=0", "must be > 0"),
    (["--optim.betas", "[0.9, 1.0]"], "optim.betas[1]=1.0", "must be in [0, 1)"),
    (["--optim.betas", "[0.9]"], "optim.betas=[0.9]", "list of 2 values"),
    (["--optim.eps", "0"], "optim.eps=0", "must be > 0"),
    (["--optim.weight_decay", "-0.1"], "optim.weight_decay=-0.1", "must be >= 0"),
    (["--optim.grad_clip", "0"], "optim.grad_clip=0", "must be > 0"),
    (["--run.precision", "fp8"], "run.precision='fp8'", "is not one of"),
    (["--run.precision", "bf61"], "run.precision='bf61'", "did you mean 'bf16'"),
    (["--run.name", "a/b"], "run.name='a/b'", "without '/'"),
    (["--run.seed", "-1"], "run.seed=-1", "must be >= 0"),
    (["--model.embed_dim", "0"], "model.embed_dim=0", "must be > 0"),
    (["--model.init_logit_scale", "5"], "model.init_logit_scale=5", "exceeds model.max_logit_scale"),
    (["--model.image.image_size", "-3"], "model.image.image_size=-3", "must be > 0"),
    (["--model.image.drop_path_rate", "1.5"], "model.image.drop_path_rate=1.5", "must be in [0, 1)"),
    (["--model.text.overrides", "{hidden_size: 64}"], "model.text.overrides=", "pretrained weights"),
    (["--model.text.pooling", "max"], "model.text.pooling='max'", "is not one of"),
    (["--model.text.max_length", "0"], "model.text.max_length=0", "must be > 0"),
    (["--data.train_data", "''"], "data.train_data=''", "is empty"),
    (["--data.mode", "resampled"], "data.samples_per_epoch=None", "virtual epoch length"),
    (["--data.num_workers", "-1"], "data.num_workers=-1", "must be >= 0"),
    (["--data.shuffle_buffer", "-5"], "data.shuffle_buffer=-5", "must be >= 0"),
    (["--data.rrc_scale", "[0.9, 0.5]"], "data.rrc_scale=(0.9, 0.5)", "0 < low <= high <= 1"),
    (["--loss.lambda_cross", "-1"], "loss.lambda_cross=-1.0", "must be >= 0"),
    (["--loss.top_k", "0", "--loss.impl", "top_k"], "loss.top_k=0", "positive integer"),
    (["--loss.impl", "top_k"], "loss.top_k=None", "needs K"),
    (["--loss.top_k", "16"], "loss.top_k=16", "only used by loss.impl=top_k"),
    (["--loss.chunk_size", "0"], "loss.chunk_size=0", "must be > 0"),
    (["--loss.impl", "fast"], "loss.impl='fast'", "is not one of"),
    (["--loss.comm", "nccl"], "loss.comm='nccl'", "is not one of"),
    (["--loss.lambda_cross", "0", "--loss.lambda_in", "0"], "loss.ranking=True", "contribute nothing"),
    (["--loss.rank_weight_hold_from", "0"], "loss.rank_weight_hold_from=0.0", "must be in (0, 1]"),
    (["--schedule.epochs", "3"], "schedule.epochs=3", "exactly one of"),
    (["--schedule.total_steps", "null"], "schedule.epochs=None", "exactly one of"),
    (["--schedule.warmup_steps", "500"], "schedule.warmup_steps=500", "longer than schedule.total_steps"),
    (["--schedule.min_lr_ratio", "2"], "schedule.min_lr_ratio=2.0", "must be in [0, 1]"),
    (["--checkpoint.keep_last", "0"], "checkpoint.keep_last=0", "must be > 0"),
    (["--checkpoint.every_steps", "-1"], "checkpoint.every_steps=-1", "must be >= 0"),
    (["--logging.log_every", "0"], "logging.log_every=0", "must be > 0"),
    (["--eval.batch_size", "0"], "eval.batch_size=0", "must be > 0"),
    (["--dist.timeout_minutes", "0"], "dist.timeout_minutes=0", "must be > 0"),
    (["--dist.backend", "mpi"], "dist.backend='mpi'", "is not one of"),
    (["--loss.ranking", "yes please"], "loss.ranking='yes please'", "true or false"),
]


@pytest.mark.parametrize(("overrides", "named", "problem"), BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_bad_value_is_named_with_fix(overrides, named, problem):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert named in msg, msg
    assert problem in msg, msg
    assert "Fix:" in msg or "did you mean" in msg, msg


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write_yaml(tmp_path, {"optim": 3}))


@pytest.mark.parametrize(
    ("micro", "accum", "glob", "world", "expect"),
    [
        (32, 1, None, 1, (32, 1, 32)),
        (32, 4, None, 8, (32, 4, 1024)),
        (None, 2, 128, 4, (16, 2, 128)),
        (16, 2, 128, 4, (16, 2, 128)),
        (None, 1, 65536, 256, (256, 1, 65536)),
    ],
)
def test_resolve_batch(micro, accum, glob, world, expect):
    cfg = load_config(
        None,
        ["--optim.micro_batch_size", str(micro) if micro else "null", "--optim.grad_accum_steps", str(accum)]
        + (["--optim.global_batch_size", str(glob)] if glob else []),
    )
    plan = resolve_batch(cfg.optim, world)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == expect
    assert plan.global_batch_size == plan.micro_batch_size * plan.grad_accum_steps * world


def test_resolve_batch_errors_name_both_numbers():
    cfg = load_config(None, ["--optim.micro_batch_size", "null", "--optim.global_batch_size", "100"])
    with pytest.raises(ConfigError, match=r"global_batch_size=100.*not divisible.*1 × 3 = 3"):
        resolve_batch(cfg.optim, 3)
    cfg = load_config(None, ["--optim.micro_batch_size", "16", "--optim.global_batch_size", "100"])
    with pytest.raises(ConfigError, match=r"global_batch_size=100.*16 × 1 × 4 = 64"):
        resolve_batch(cfg.optim, 4)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(
        None, ["--optim.lr", "3e-4", "--data.rrc_scale", "[0.5, 0.8]", "--loss.impl", "top_k", "--loss.top_k", "16"]
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file()
    assert load_config(path) == cfg
    assert config_to_dict(cfg)["data"]["rrc_scale"] == [0.5, 0.8]


def _all_sections(cls=Config):
    hints = typing.get_type_hints(cls)
    yield cls
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_sections(hints[f.name])


@pytest.mark.parametrize("section", list(_all_sections()), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(section):
    docs = field_docs(section)
    missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
    assert not missing, f"{section.__name__} fields without a docstring: {missing}"


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # 30 steps, 10 per epoch (3 epochs), w_max = 1.5, step ramp held from 2/3: the hand-computed w(t)
        ("constant", {0: 1.5, 1: 1.5, 15: 1.5, 29: 1.5}),
        ("step", {0: 0.0, 10: 0.75, 20: 1.5, 29: 1.5}),
        ("epoch", {0: 0.0, 9: 0.0, 10: 1.5, 29: 1.5}),
    ],
)
def test_rank_weight_schedule_as_trained(schedule, expected):
    """``loss.rank_weight_schedule`` through the objective the trainer builds: ``constant`` is w_max from step 0
    (no ramp); a plain-CLIP run has w = 0 whatever the schedule."""
    import torch

    from rankclip_ds.trainer.loss import TrainingLoss
    from rankclip_ds.trainer.setup import TrainingLength

    def weights(*overrides: str) -> dict[int, float]:
        cfg = load_config(None, ["--loss.rank_weight_schedule", schedule, "--loss.rank_weight_max", "1.5", *overrides])
        length = TrainingLength(steps_per_epoch=10, total_steps=30, epochs=3)
        loss = TrainingLoss(
            cfg.loss, group=None, world_size=1, local_rows=8, max_logit_scale=100.0, length=length,
            device=torch.device("cpu"),
        )  # fmt: skip
        return {step: loss.rank_weight(step) for step in expected}

    assert weights() == pytest.approx(expected)
    assert weights("--loss.ranking", "false") == dict.fromkeys(expected, 0.0)


def test_rank_weight_schedule_names_the_choices():
    with pytest.raises(ConfigError, match=r"loss\.rank_weight_schedule='flat'.*is not one of.*'constant'"):
        load_config(None, ["--loss.rank_weight_schedule", "flat"])
