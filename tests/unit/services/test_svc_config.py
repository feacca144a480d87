"""Configuration: flags > TAXIWAY_* environment > YAML file > dataclass defaults; validation."""

from __future__ import annotations

import pytest

from services.common.config import resolve
from services.executor.config import ExecutorConfig
from services.gateway.config import GatewayConfig
from services.scheduler.config import SchedulerConfig
from gpu_engine.config import EngineConfig
from services.serve import role_configs, setting_names


def test_defaults_come_from_the_dataclass():
    assert resolve(GatewayConfig, "gateway") == GatewayConfig()
    assert (GatewayConfig().port, SchedulerConfig().port, ExecutorConfig().port) == (50051, 50053, 50054)


def test_precedence_cli_over_env_over_file_over_defaults():
    file = {"port": 1000, "request_timeout_s": 5, "gateway": {"port": 2000}}
    assert resolve(GatewayConfig, "gateway", file=file).port == 2000  # the role's section wins
    env = {"TAXIWAY_PORT": "3000"}
    cfg = resolve(GatewayConfig, "gateway", env=env, file=file)
    assert (cfg.port, cfg.request_timeout_s) == (3000, 5)
    assert resolve(GatewayConfig, "gateway", cli={"port": 4000}, env=env, file=file).port == 4000
    assert resolve(GatewayConfig, "gateway", cli={"port": None}, env=env).port == 3000


def test_redis_url_env_and_types():
    env = {"REDIS_URL": "redis://a/0"}
    assert resolve(GatewayConfig, "gateway", env=env).redis_url == "redis://a/0"
    env["TAXIWAY_REDIS_URL"] = "redis://b/0"
    assert resolve(GatewayConfig, "gateway", env=env).redis_url == "redis://b/0"
    cfg = resolve(ExecutorConfig, "executor", env={"TAXIWAY_FAKE_ENGINE": "true",
                                                   "TAXIWAY_FAKE_STEP_S": "0.5"})
    assert cfg.fake_engine is True and cfg.fake_step_s == 0.5


def test_bad_values_name_the_setting_and_the_fix():
    with pytest.raises(ValueError, match="TAXIWAY_PORT='abc'"):
        resolve(GatewayConfig, "gateway", env={"TAXIWAY_PORT": "abc"})
    with pytest.raises(ValueError, match="port must be an integer in 0..65535"):
        resolve(GatewayConfig, "gateway", cli={"port": 70000})
    with pytest.raises(ValueError, match="unknown setting 'prot'"):
        resolve(GatewayConfig, "gateway", file={"prot": 1}, known={"port"})
    with pytest.raises(ValueError, match="must exceed twice"):
        ExecutorConfig(heartbeat_interval_s=1.0, registration_ttl_s=1.5)


def test_serve_all_gives_port_flags_to_the_gateway_only():
    known = setting_names()
    configs = role_configs({"port": 6000, "model": "/m"}, {"TAXIWAY_HOST": "0.0.0.0"},
                           {"tokenizer": {"port": 7000}}, known)
    assert (configs["gateway"].port, configs["gateway"].host) == (6000, "0.0.0.0")
    assert configs["tokenizer"].port == 7000 and configs["tokenizer"].model == "/m"
    assert configs["executor"].port == 50054 and configs["executor"].host == "127.0.0.1"
    assert configs["gateway"].tokenizer_address == "127.0.0.1:7000"


def test_every_setting_the_deploy_files_pass_is_a_serve_flag():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    files = [root / "compose.yaml", *sorted((root / "deploy").rglob("*.yaml"))]
    used = {m for f in files if f.exists() for m in re.findall(r"TAXIWAY_([A-Z_]+)", f.read_text())}
    not_settings = {"CACHE_DIR", "IMAGE", "GPU_IMAGE", "GATEWAY_PORT"}  # model cache; compose-only
    flags = {f.upper() for f in setting_names()} | {"ROLE", "CONFIG"}
    assert used - not_settings <= flags, sorted(used - not_settings - flags)


def test_engine_settings_are_executor_settings_from_every_source():
    """One declaration: each EngineConfig field is an executor flag, variable and YAML key."""
    assert set(EngineConfig.field_names()) <= setting_names()
    cfg = resolve(ExecutorConfig, "executor", cli={"max_num_seqs": 8, "gpu_memory_utilization": None},
                  env={"TAXIWAY_GPU_MEMORY_UTILIZATION": "0.5", "TAXIWAY_ENABLE_PREFIX_CACHING": "off"},
                  file={"executor": {"block_size": 32, "model": "/m"}, "max_model_len": 512},
                  known=setting_names())
    assert cfg.engine == EngineConfig(model="/m", max_num_seqs=8, gpu_memory_utilization=0.5,
                                      enable_prefix_caching=False, block_size=32, max_model_len=512)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        resolve(ExecutorConfig, "executor", env={"TAXIWAY_BLOCK_SIZE": "12"})
    with pytest.raises(ValueError, match="unknown setting 'engine'"):
        resolve(ExecutorConfig, "executor", file={"engine": {"block_size": 32}}, known=setting_names())


def test_serve_flags_reach_the_engine_config(tmp_path):
    import argparse

    from services.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-num-seqs", "4", "--no-enable-prefix-caching",
                              "--admission-policy", "guaranteed_no_evict", "--max-model-len", "300"])
    cli = {name: getattr(args, name) for name in setting_names()}
    engine = role_configs(cli, {}, {}, setting_names())["executor"].engine
    assert (engine.max_num_seqs, engine.enable_prefix_caching, engine.admission_policy,
            engine.max_model_len) == (4, False, "guaranteed_no_evict", 300)



def test_the_speculative_config_flag_reaches_the_engine_config():
    import argparse

    from services.serve import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    cli = {name: getattr(args, name) for name in setting_names()}
    engine = role_configs(cli, {}, {}, setting_names())["executor"].engine
    assert engine.speculative.method == "ngram" and engine.speculative.num_speculative_tokens == 3
    with pytest.raises(ValueError, match="unknown keys"):
        role_configs({**cli, "speculative_config": {"method": "ngram", "k": 3}}, {}, {}, setting_names())


def test_json_settings_parse_or_name_the_problem():
    from services.common.config import parse_value

    assert parse_value('{"method": "ngram", "k": 3}', dict | None) == {"method": "ngram", "k": 3}
    with pytest.raises(ValueError, match="expected a JSON object"):
        parse_value("[1, 2]", dict | None)
    with pytest.raises(ValueError, match="expected JSON"):
        parse_value("{nope", dict)


def test_gateway_replicas_are_children_of_serve_all_only(capsys):
    from services.serve import children, main, shared_gateway_ports

    with pytest.raises(ValueError, match="gateway_replicas must be in 1..64"):
        GatewayConfig(gateway_replicas=0)
    assert main(["--role", "gateway", "--gateway-replicas", "2"]) == 2  # refused before anything starts
    assert "gateway_replicas is for --role all" in capsys.readouterr().err
    configs = shared_gateway_ports(role_configs({"gateway_replicas": 3, "port": 0, "gateway_id": "gw"}, {}, {},
                                                setting_names()))
    kids = children(configs)
    gateways = [(name, c) for name, role, c in kids if role == "gateway"]
    assert [n for n, _ in gateways] == ["gateway", "gateway-2", "gateway-3"]
    assert len({c.port for _, c in gateways}) == 1 and gateways[0][1].port != 0  # one port, picked once
    assert all(c.reuse_port and c.gateway_replicas == 1 for _, c in gateways)
    assert [c.gateway_id for _, c in gateways] == ["gw", "gw-2", "gw-3"]
    assert [c.metrics_port for _, c in gateways] == [9091, 0, 0]
    assert [role for _, role, _ in kids if role != "gateway"] == ["tokenizer", "executor", "scheduler"]
