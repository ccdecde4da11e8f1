import argparse
from pathlib import Path

import pytest

from loraserve.server.config import ServerConfig
from loraserve.server.settings import FLAT, add_arguments, from_args


def parse(argv, env):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), env)


def test_flags_beat_env_beat_defaults():
    cfg = parse(["--port", "7000"], {"LORASERVE_PORT": "6000", "LORASERVE_QUANTIZATION": "nf4",
                                     "LORASERVE_TLS_CERT": "c.pem", "LORASERVE_TLS_KEY": "k.pem"})
    assert (cfg.fronts.port, cfg.model.quantization, cfg.security.tls_cert) == (7000, "nf4", Path("c.pem"))
    assert cfg.scheduler.max_batch_size == ServerConfig().scheduler.max_batch_size


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "port"),
    (["--port", "abc"], "port='abc'"),
    (["--port", "7000", "--health-port", "7000"], "health_port must differ"),
    (["--health-port", "-2"], "health_port"),
    (["--tls-cert", "only.pem"], "tls_cert and tls_key"),
    (["--device", "tpu"], "device"),
    (["--dtype", "float8"], "dtype"),
    (["--tls-client-ca", "ca.pem"], "tls_client_ca"),
    (["--max-streams-per-client", "-1"], "max_streams_per_client"),
    (["--default-max-new-tokens", "900"], "default_max_new_tokens"),
    (["--max-prompt-tokens", "9000"], "max_batch_tokens"),
    (["--warm", "legal,medical@v2"], "warm and pin"),
    (["--pin", "../legal"], "warm and pin"),
    (["--warm-schedule", "08:55=../support"], "warm_schedule"),
    (["--client-id-metadata-key", "X-Client"], "client_id_metadata_key"),
    (["--client-id-metadata-key", "x-client-bin"], "client_id_metadata_key"),
    (["--client-id-metadata-key", "authorization"], "client_id_metadata_key"),
    (["--client-id-metadata-key", "grpc-client"], "client_id_metadata_key"),
    (["--client-id-metadata-key", "x-client-id", "--auth-tokens-file", "t.json"], "only without auth_tokens_file"),
    (["--kv-block-size", "0"], "kv_block_size"),
    (["--kv-cache-mib", "-1"], "kv_cache_mib"),
    (["--gpu-memory-fraction", "1.5"], "gpu_memory_fraction"),
    (["--gpu-memory-fraction", "0"], "gpu_memory_fraction"),
    (["--attention", "paged"], "attention must be one of auto, flex, reference"),
    (["--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
])
def test_nonsense_fails_fast(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv, {})


def test_a_trusted_client_id_key_is_taken_from_the_environment():
    cfg = parse([], {"LORASERVE_CLIENT_ID_METADATA_KEY": "x-client-id"})
    assert cfg.security.client_id_metadata_key == "x-client-id"


def test_switches_are_flags_and_true_or_false_in_the_environment():
    assert parse(["--no-cuda-graphs"], {}).engine.no_cuda_graphs is True
    assert parse(["--deterministic"], {}).engine.deterministic is True
    assert parse([], {"LORASERVE_DETERMINISTIC": "true"}).engine.deterministic is True
    assert parse([], {}).engine.deterministic is False
    assert parse([], {"LORASERVE_NO_CUDA_GRAPHS": "true"}).engine.no_cuda_graphs is True
    assert parse([], {"LORASERVE_NO_CUDA_GRAPHS": "0"}).engine.no_cuda_graphs is False
    with pytest.raises(ValueError, match="no_cuda_graphs='maybe'"):
        parse([], {"LORASERVE_NO_CUDA_GRAPHS": "maybe"})


def test_every_setting_has_a_row_in_the_docs_configuration_table():
    operations = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = operations[operations.index("\n## Configuration\n") + 1:]
    table = section[:section.index("\n## ")]
    missing = [name for name in FLAT
               if f"`--{name.replace('_', '-')}`" not in table or f"LORASERVE_{name.upper()}" not in table]
    assert not missing, f"docs/operations.md's configuration table lacks {missing}"


def test_lora_target_modules_are_leaf_names_of_linear_layers():
    assert parse(["--lora-target-modules", "q_proj, v_proj"], {}).lora.lora_target_modules == ("q_proj", "v_proj")
    assert parse([], {"LORASERVE_LORA_TARGET_MODULES": "o_proj"}).lora.lora_target_modules == ("o_proj",)
    assert parse([], {}).lora.lora_target_modules == ()
    for bad in ("model.layers.0.q_proj", "lm_head", "q-proj"):
        with pytest.raises(ValueError, match="lora_target_modules"):
            parse(["--lora-target-modules", bad], {})


def test_a_config_file_takes_sections_and_yields_to_the_environment_and_flags(tmp_path):
    toml = tmp_path / "loraserve.toml"
    toml.write_text('[fronts]\nport = 6000\nhost = "0.0.0.0"\n[scheduler]\nmax_batch_size = 4\n'
                    '[lora]\npin = ["support"]\n')
    cfg = parse(["--config", str(toml), "--port", "7000"], {"LORASERVE_HOST": "10.0.0.1"})
    assert (cfg.fronts.port, cfg.fronts.host, cfg.scheduler.max_batch_size, cfg.lora.pin) == \
        (7000, "10.0.0.1", 4, ("support",))
    yaml_file = tmp_path / "loraserve.yaml"
    yaml_file.write_text("scheduler:\n  max_batch_size: 8\nengine:\n  deterministic: true\n")
    cfg = parse([], {"LORASERVE_CONFIG": str(yaml_file), "LORASERVE_MAX_BATCH_SIZE": "2"})
    assert (cfg.scheduler.max_batch_size, cfg.engine.deterministic) == (2, True)


@pytest.mark.parametrize("text, message", [
    ("[fronts]\nport = 70000\n", "port 70000"),
    ("[fronts]\nmax_batch_size = 4\n", "max_batch_size"),  # a field of another section
    ("[nonsense]\nport = 1\n", "nonsense"),
    ("port = 1\n", "sections"),
    ("[fronts\n", "loraserve.toml"),
])
def test_a_config_file_is_validated_like_flags(tmp_path, text, message):
    path = tmp_path / "loraserve.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse(["--config", str(path)], {})


def test_the_help_has_a_group_per_section_and_every_flat_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    groups = {g.title.split()[0]: {a.dest for a in g._group_actions} for g in parser._action_groups}
    for section, model in ServerConfig.model_fields.items():
        assert groups[section] == set(model.annotation.model_fields), section
    assert "Most sequences decoded together in one batch." in parser.format_help()
