"""ModelConfig validation, presets and file IO."""

import json
import re
import subprocess
import sys

import pytest

from polyglu.config import (
    MODEL_PRESETS,
    ROUTING_POOLS,
    ConfigError,
    ModelConfig,
    RunConfig,
    load_mapping,
    routing_is_causal,
)


def test_paper_preset_numbers():
    c = ModelConfig.from_preset("paper-600m")
    assert (c.vocab_size, c.d_model, c.d_ff, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == \
        (151_669, 1024, 4096, 28, 16, 8, 64)
    assert (c.max_seq_len, c.rope_theta, c.norm_eps, c.tie_embeddings) == (4096, 10_000.0, 1e-6, True)
    assert c.activations == ("relu", "tanh", "silu", "gelu") and c.gate_hidden == 32
    assert c.routing_pool == "causal" and c.eval_routing == "soft"


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_is_valid(name):
    assert ModelConfig.from_preset(name).to_dict()["d_model"] > 0


@pytest.mark.parametrize("overrides,match", [
    (dict(n_heads=6, n_kv_heads=4), "n_heads .6. must be divisible by n_kv_heads .4."),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(d_ff=-4), "d_ff must be a positive integer"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(activations=["relu", "swish"]), "unknown activation 'swish'"),
    (dict(activations=[]), "at least one activation"),
    (dict(ffn="moe"), "ffn must be one of"),
    (dict(routing_pool="mean"), "routing_pool must be one of"),
    (dict(eval_routing="noisy"), "eval_routing must be one of"),
    (dict(norm_eps=0.0), "norm_eps must be a positive number"),
    (dict(d_model="1024"), "config key 'd_model' has str value"),
    (dict(hidden_size=10), "unknown config key 'hidden_size'"),
])
def test_bad_values_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_preset("debug", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        ModelConfig.from_preset("huge")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_round_trip_and_unknown_keys(tmp_path, suffix):
    config = ModelConfig.from_preset("small", routing_pool="token")
    path = tmp_path / f"model{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config.to_dict()))
    else:
        import yaml

        path.write_text(yaml.safe_dump(config.to_dict()))
    assert ModelConfig.from_file(path) == config
    data = config.to_dict()
    data["n_layer"] = 4  # a typo must not be silently dropped
    path.write_text(json.dumps(data) if suffix == ".json" else __import__("yaml").safe_dump(data))
    with pytest.raises(ConfigError, match=r"model\..*: unknown config key 'n_layer'"):
        ModelConfig.from_file(path)


def test_ints_accepted_for_floats_and_lists_for_tuples():
    c = ModelConfig.from_dict({"rope_theta": 500000, "activations": ["gelu", "silu"]})
    assert c.rope_theta == 500000.0 and isinstance(c.rope_theta, float)
    assert c.activations == ("gelu", "silu")


@pytest.mark.parametrize("text, match", [
    (b"train:\n  max_steps: 1\n  max_steps: 2\n", r"c.yaml line 3: duplicate key 'max_steps' \(first at line 2\)"),
    (b"", r"c.yaml is empty"),
    (b"# nothing but a comment\n", r"c.yaml is empty"),
    (b"train:\n  betas: [0.9\nmodel: {}\n", r"c.yaml line 3: YAML syntax error .*flow sequence started at line 2"),
    (b"train:\n  x: \"\xff\"\n", r"c.yaml line 2: not UTF-8 \(byte 0xff at byte offset 13\)"),
    (b"- a\n- b\n", r"c.yaml: top level must be a mapping, got list"),
])
def test_bad_yaml_files_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=match):
        load_mapping(path)


def test_yaml_floats_in_exponent_form_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  eps: 1E-8\n  warmup_steps: 10\n  max_steps: 1_000\nname: 1e3x\n")
    assert load_mapping(path) == {"train": {"lr": 0.001, "eps": 1e-8, "warmup_steps": 10, "max_steps": 1000},
                                  "name": "1e3x"}
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  lr: 1e-3\n")
    assert RunConfig.load(run).train.lr == RunConfig.load(None, ["train.lr=1e-3"]).train.lr == 0.001
    json_path = tmp_path / "c.json"
    json_path.write_text('{"a": 1,\n "a": 2}\n')
    with pytest.raises(ConfigError, match=r"c.json line 2: duplicate key 'a'"):
        load_mapping(json_path)


def test_model_override_without_model_section_refines_the_default_preset():
    from polyglu.config import RunConfig

    config = RunConfig.load(None, ["model.d_model=128"])
    model = config.model_config()
    # the debug preset, with only d_model changed (not the paper-size ModelConfig defaults)
    assert model.d_model == 128
    assert model.n_layers == ModelConfig.from_preset("debug").n_layers
    assert model.vocab_size == ModelConfig.from_preset("debug").vocab_size


def test_overrides_may_follow_flags_on_the_command_line(monkeypatch):
    import polyglu.commands.train as train_command
    from polyglu import cli

    seen = {}
    monkeypatch.setattr(train_command, "run", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["train", "train.max_steps=6", "--resume", "run_dir=runs/x"]) == 0
    assert seen["resume"] and seen["overrides"] == ["train.max_steps=6", "run_dir=runs/x"]
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", "--no-such-flag"])


# the truth table of "is this routing causal?"; a pool added to ROUTING_POOLS must be added here
CAUSAL_POOL = {"causal": True, "token": True, "sequence": False}


def test_routing_is_causal_truth_table():
    assert set(CAUSAL_POOL) == set(ROUTING_POOLS)
    for pool, causal in CAUSAL_POOL.items():
        assert routing_is_causal(pool) is causal
        # a pool that is never read cannot see the future: one activation, or static routing (no gate_net)
        assert routing_is_causal(pool, n_activations=1) is True
        assert routing_is_causal(pool, routing_mode="static") is True
        assert routing_is_causal(pool, routing_mode="dynamic") is causal
    with pytest.raises(ConfigError, match="routing_pool must be one of .* got 'lookahead'"):
        routing_is_causal("lookahead")


@pytest.mark.parametrize("pool", ROUTING_POOLS)
def test_model_config_causal_routing_follows_the_pool(pool):
    config = ModelConfig.from_preset("debug", routing_pool=pool)
    assert config.causal_routing is CAUSAL_POOL[pool]
    assert config.replace(ffn="swiglu").causal_routing is True  # a baseline FFN has no routing
    assert config.replace(activations=["silu"]).causal_routing is True
    assert config.replace(routing_mode="static").causal_routing is True


def test_an_error_a_command_line_override_brings_is_blamed_on_the_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as error:
        RunConfig.load(path, ["train.max_steps=5", "train.max_step=3"])
    assert str(error.value).startswith("command-line override train.max_step=3: unknown config key 'train.max_step'")
    with pytest.raises(ConfigError, match=r"^command-line override model.n_heads=3: model: "):
        RunConfig.load(path, ["model.n_heads=3"])
    with pytest.raises(ConfigError, match=r"^command-line override train.max_step=3: "):
        RunConfig.load(None, ["train.max_step=3"])
    # the file's own mistake is still the file's, whatever the command line adds
    path.write_text("train:\n  lr_typo: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown config key 'train.lr_typo'"):
        RunConfig.load(path, ["train.max_steps=5"])


def test_a_files_own_error_names_the_file_without_overrides_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: -1\n")
    with pytest.raises(ConfigError) as error:
        RunConfig.load(path)
    assert str(error.value) == f"{path}: train.lr must be positive, got -1.0"
    # an override that sets the value right makes the run valid: the merged config is what is checked
    assert RunConfig.load(path, ["train.lr=1e-3"]).train.lr == 0.001


def test_each_config_is_checked_once(monkeypatch):
    built = []
    check = ModelConfig.__post_init__
    monkeypatch.setattr(ModelConfig, "__post_init__", lambda self: built.append(1) or check(self))
    config = RunConfig.load(None, ["model.d_model=128", "train.max_steps=5"])
    assert len(built) == 1  # the model section, checked when the run config was built
    first, second = config.model_config(), config.model_config()
    assert len(built) == 1 and first == second and first is not second  # copies of the one checked config
    first.d_model = 64  # a caller's copy: the run's model is unchanged
    assert config.model_config().d_model == 128
    config.model["d_model"] = 96  # a changed section is checked again, once
    assert config.model_config().d_model == config.model_config().d_model == 96 and len(built) == 2
    with pytest.raises(ConfigError, match="model: ModelConfig.d_model must be a positive integer, got 0"):
        config.model["d_model"] = 0
        config.model_config()


def test_reading_and_checking_configs_does_not_import_torch():
    # the CLI reads a run config before it imports torch: the settings modules stay torch-free
    code = ("import sys; from polyglu.config import RunConfig; import polyglu.model_config, polyglu.train.config; "
            "RunConfig.load(None, ['model.d_model=128']).model_config(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
