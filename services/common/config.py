"""Configuration: one frozen dataclass per role, filled from CLI flags > TAXIWAY_* environment
variables > a YAML file > the dataclass defaults.

Every field is documented with `option(default, help)`; `taxiway serve` builds its flags from the
fields, so defaults live in one place. A field whose type is itself a config dataclass (the
executor's `engine: EngineConfig`) is nested: its fields are flags, variables and keys of their own,
flat like the others. The YAML file holds flat keys (for every role that has the field) and per-role
sections that override them:

    redis_url: redis://10.0.0.5:6379/0
    model: /models/llama
    executor: {port: 50060}
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from gpu_engine.config import setting as option  # noqa: F401 - one way to declare a documented field

ENV_PREFIX = "TAXIWAY_"
ROLES = ("gateway", "tokenizer", "scheduler", "executor")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_type(cls: type, name: str) -> type:
    return base_type(typing.get_type_hints(cls)[name])


def base_type(tp: Any) -> type:
    """int for `int | None`; dict for `dict | None` and `dict[str, Any]`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (dict, list):
        return typing.get_origin(tp)
    return base_type(args[0]) if args else tp


def nested_config(cls: type, name: str) -> type | None:
    """The config dataclass a field holds, if it is a nested section."""
    tp = field_type(cls, name)
    return tp if dataclasses.is_dataclass(tp) else None


def leaf_fields(cls: type) -> Iterator[tuple[type, dataclasses.Field]]:
    """(owner class, field) for every setting of `cls`, nested sections flattened."""
    for f in dataclasses.fields(cls):
        sub = nested_config(cls, f.name)
        if sub is not None:
            yield from leaf_fields(sub)
        else:
            yield cls, f


def flat_dict(config: Any) -> dict[str, Any]:
    """A config's settings as flat name -> value (nested sections flattened), for a YAML file."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_dict(value))
        else:
            out[f.name] = value
    return out


def parse_value(text: str, tp: Any) -> Any:
    """Parses an environment variable's text as a field of type `tp`."""
    base = base_type(tp)
    if text == "" and base is not str:
        return None
    if base in (dict, list):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected JSON, got {text!r}: {exc}") from None
        if not isinstance(value, base):
            raise ValueError(f"expected a JSON {'object' if base is dict else 'array'}, got {text!r}")
        return value
    if base is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    return base(text)


def load_yaml(path: str | Path | None) -> dict:
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def resolve(cls: type, role: str, *, cli: Mapping[str, Any] | None = None,
            env: Mapping[str, str] | None = None, file: Mapping[str, Any] | None = None,
            known: set[str] | None = None) -> Any:
    """Builds `cls` for `role` from CLI values (None = not given), the environment and YAML data.

    `known` is every field name of every role: YAML keys outside it are reported as typos.
    """
    cli, env, file = cli or {}, env or {}, dict(file or {})
    nested = {f.name: sub for f in dataclasses.fields(cls) if (sub := nested_config(cls, f.name))}
    names = {f.name for f in dataclasses.fields(cls)} - set(nested)
    values: dict[str, Any] = {
        name: resolve(sub, role, cli=cli, env=env, file=file, known=known)
        for name, sub in nested.items()
    }

    section = file.pop(role, None) or {}
    for other in ROLES:
        file.pop(other, None)
    for source in (file, section):
        for key, value in source.items():
            name = str(key).replace("-", "_")
            if name in names:
                values[name] = value
            elif known is not None and name not in known:
                raise ValueError(f"unknown setting {key!r} in the config file; known: {sorted(known)}")

    if "redis_url" in names and env.get("REDIS_URL"):
        values["redis_url"] = env["REDIS_URL"]
    for name in names:
        text = env.get(ENV_PREFIX + name.upper())
        if text is not None:
            try:
                values[name] = parse_value(text, field_type(cls, name))
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r}: {exc}") from None

    values.update({k: v for k, v in cli.items() if k in names and v is not None})
    return cls(**values)


def require(ok: bool, message: str) -> None:
    """For __post_init__ validation: raise ValueError(message) unless ok."""
    if not ok:
        raise ValueError(message)


def check_port(port: int, name: str = "port") -> None:
    require(isinstance(port, int) and 0 <= port <= 65535,
            f"{name} must be an integer in 0..65535 (0 picks a free port), got {port!r}")


DRAIN_TIMEOUT_S = 30.0
DRAIN_HELP = ("on SIGTERM, seconds to let running requests finish before exiting; keep it under the "
              "pod's terminationGracePeriodSeconds minus its preStop sleep")


def check_drain(seconds: float) -> None:
    require(seconds >= 0, f"drain_timeout_s must be >= 0 seconds, got {seconds!r}")


def metrics_port_option(default: int) -> Any:
    """The `metrics_port` field every tier has (its /metrics endpoint)."""
    return option(default, "HTTP port of the Prometheus /metrics endpoint, on the same host "
                           "(0 picks a free one)")


def check_serving(cfg: Any) -> None:
    """The checks every tier's config shares: its gRPC and metrics ports and its drain time."""
    check_port(cfg.port)
    check_port(cfg.metrics_port, "metrics_port")
    check_drain(cfg.drain_timeout_s)


@dataclasses.dataclass(frozen=True)
class SecurityOptions:
    """Settings every tier has: the credential between tiers, TLS on its port, reflection."""

    internal_token: str | None = option(
        None, "the credential the tiers present to each other (metadata `authorization: Bearer "
              "<token>`); the same on every tier, from a Secret (TAXIWAY_INTERNAL_TOKEN), never on "
              "a command line; internal RPCs without it get UNAUTHENTICATED")
    internal_token_file: str | None = option(None, "a file holding internal_token (a mounted Secret)")
    insecure_internal: bool = option(False, "run without internal_token: this tier's internal RPCs "
                                            "obey any caller (a closed test rig only)")
    tls_cert_file: str | None = option(None, "PEM certificate chain: serve this tier's gRPC port "
                                             "over TLS (with tls_key_file)")
    tls_key_file: str | None = option(None, "PEM private key of tls_cert_file")
    internal_tls_ca_file: str | None = option(None, "PEM CA bundle of the other tiers' certificates: "
                                                    "dial them over TLS (when they serve TLS)")
    reflection: bool = option(True, "serve gRPC server reflection (grpcurl list/describe)")

    def check_security(self) -> None:
        require(bool(self.tls_cert_file) == bool(self.tls_key_file),
                "tls_cert_file and tls_key_file go together: set both or neither")
        require(not (self.internal_token and self.internal_token_file),
                "set internal_token or internal_token_file, not both")

    def internal_credential(self) -> str | None:
        """The internal token (read from its file if given); raises ValueError when there is none
        and insecure_internal is off."""
        token = self.internal_token
        if self.internal_token_file:
            token = _read_secret(self.internal_token_file, "internal_token_file")
        if not token and not self.insecure_internal:
            raise ValueError("no internal credential: set internal_token (TAXIWAY_INTERNAL_TOKEN, "
                             "the same on every tier) or internal_token_file, or insecure_internal "
                             "to run without one")
        return token or None


@dataclasses.dataclass(frozen=True)
class RedisOptions:
    """How a tier reaches Redis (the gateway, scheduler and executor)."""

    redis_url: str | None = option(None, "Redis URL: redis://host:6379/0, or rediss:// for TLS "
                                         "(also REDIS_URL)")
    redis_username: str | None = option(None, "Redis ACL user (default: the URL's, else 'default')")
    redis_password: str | None = option(None, "Redis password (AUTH), from a Secret "
                                              "(TAXIWAY_REDIS_PASSWORD); the URL's wins if it has one")
    redis_ca_file: str | None = option(None, "PEM CA bundle that verifies a rediss:// server")

    def check_redis(self) -> None:
        require(not self.redis_ca_file or (self.redis_url or "").startswith("rediss://"),
                f"redis_ca_file needs a rediss:// URL (TLS), got {self.redis_url!r}")

    def redis_options(self) -> dict:
        """Keyword arguments for streams.connect."""
        out = {}
        if self.redis_username:
            out["username"] = self.redis_username
        if self.redis_password:
            out["password"] = self.redis_password
        if self.redis_ca_file:
            out["ssl_ca_certs"] = self.redis_ca_file
        return out


def _read_secret(path: str, name: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path}: {exc}") from None
