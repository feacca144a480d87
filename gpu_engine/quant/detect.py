"""Recognising a pre-quantized checkpoint from its config, without any flag, and reconciling it
with what the user asked for.

    config.json quantization_config: quant_method compressed-tensors (llm-compressor), fp8 (vLLM's),
        modelopt, awq (AutoAWQ GEMM layout)
    hf_quant_config.json: ModelOpt's own file ({"quantization": {"quant_algo": "FP8", ...}})

Anything outside what the methods serve is an error naming the field, its value and what is
supported; nothing falls back to 16-bit weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpu_engine.errors import ModelLoadError
from gpu_engine.quant.spec import ActivationScheme, QuantSpec, WeightScheme, online_fp8


def read_checkpoint_quant(folder: Path) -> QuantSpec | None:
    """The quantization a checkpoint folder was saved with, or None for a 16/32-bit one."""
    cfg_file, modelopt_file = folder / "config.json", folder / "hf_quant_config.json"
    qcfg = None
    if cfg_file.is_file():
        qcfg = _json(cfg_file).get("quantization_config")
    if qcfg is None and modelopt_file.is_file():
        data = _json(modelopt_file)
        if "quantization" not in data:
            raise ModelLoadError(f"{modelopt_file} has no 'quantization' section")
        return _modelopt(data["quantization"], str(modelopt_file))
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise ModelLoadError(f"{cfg_file}: quantization_config must be an object, got {qcfg!r}")
    return parse_quantization_config(qcfg, str(cfg_file))


def parse_quantization_config(qcfg: dict[str, Any], where: str = "config.json") -> QuantSpec:
    method = qcfg.get("quant_method")
    parsers = {"compressed-tensors": _compressed_tensors, "fp8": _vllm_fp8, "modelopt": _modelopt,
               "awq": _awq}
    if method not in parsers:
        raise ModelLoadError(f"{where}: quantization_config.quant_method {method!r} is not supported "
                             f"(supported: {', '.join(parsers)})")
    return parsers[method](qcfg, where)


def resolve_quantization(flag: str | None, detected: QuantSpec | None, dummy: bool) -> QuantSpec | None:
    """What to serve: the checkpoint's own scheme; `flag` (EngineConfig.quantization) must agree
    with it. quantization="fp8" on a 16/32-bit checkpoint (or dummy weights) quantizes online."""
    if detected is not None:
        if flag is not None and flag != detected.method:
            raise ModelLoadError(
                f"quantization={flag!r} contradicts the checkpoint, which is {detected.describe()}; "
                f"drop the flag (pre-quantized checkpoints are recognised without it)")
        return detected
    if flag is None:
        return None
    if flag == "fp8":
        return online_fp8()
    if dummy:
        from gpu_engine.quant.methods import method_class

        return method_class(flag).dummy_spec()
    raise ModelLoadError(
        f"quantization={flag!r} needs a checkpoint quantized with it (its config.json says so), "
        f"and this one is not quantized; make one with `taxiway quantize --method {flag}`")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _unsupported(where: str, field: str, value: Any, supported: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: {field} = {value!r} is not supported (supported: {supported})")


# -- compressed-tensors (llm-compressor) ---------------------------------------------------------
def _compressed_tensors(q: dict, where: str) -> QuantSpec:
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _unsupported(where, "quantization_config.config_groups", sorted(groups),
                           "exactly one group targeting Linear")
    (gname, group), = groups.items()
    at = f"quantization_config.config_groups.{gname}"
    if group.get("targets") != ["Linear"]:
        raise _unsupported(where, f"{at}.targets", group.get("targets"), '["Linear"]')
    fmt = group.get("format") or q.get("format")
    w = group.get("weights") or {}
    acts = group.get("input_activations")
    if group.get("output_activations"):
        raise _unsupported(where, f"{at}.output_activations", group["output_activations"], "null")
    weights = _ct_weights(w, f"{at}.weights", where)
    if weights.type == "float":
        if fmt != "float-quantized":
            raise _unsupported(where, "quantization_config.format", fmt, "float-quantized for FP8 weights")
        method, activations = "fp8", _ct_activations(acts, f"{at}.input_activations", where)
    else:
        if fmt != "pack-quantized":
            raise _unsupported(where, "quantization_config.format", fmt, "pack-quantized for INT4 weights")
        if acts is not None:
            raise _unsupported(where, f"{at}.input_activations", acts, "null (INT4 is weight-only, W4A16)")
        method, activations = "awq", None
    return QuantSpec(
        method=method, source="compressed-tensors", weights=weights, activations=activations,
        serialized=True, ignore=tuple(q.get("ignore") or ()),
        kv_cache=_ct_kv_scheme(q.get("kv_cache_scheme"), where), checkpoint_format=fmt,
    )


def _ct_weights(w: dict, at: str, where: str) -> WeightScheme:
    bits, typ, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
    if (bits, typ) == (8, "float"):
        if strategy not in ("channel", "tensor"):
            raise _unsupported(where, f"{at}.strategy", strategy, "channel, tensor for FP8 weights")
        if not w.get("symmetric", True):
            raise _unsupported(where, f"{at}.symmetric", False, "true for FP8 weights")
        return WeightScheme(num_bits=8, type="float", strategy=strategy)
    if (bits, typ) == (4, "int"):
        group = w.get("group_size") if strategy == "group" else None
        if strategy not in ("group", "channel") or (strategy == "group" and (not isinstance(group, int) or group < 1)):
            raise _unsupported(where, f"{at}.strategy/group_size", (strategy, w.get("group_size")),
                               "group with a positive group_size, or channel, for INT4 weights")
        if w.get("actorder") not in (None, False, "weight", "static"):  # weight / static: groups stay contiguous
            raise _unsupported(where, f"{at}.actorder", w["actorder"],
                               "null, weight or static (group / dynamic act-order needs a g_idx, which is not)")
        return WeightScheme(num_bits=4, type="int", strategy=strategy, group_size=group,
                            symmetric=bool(w.get("symmetric", True)))
    raise _unsupported(where, f"{at} num_bits/type", (bits, typ), "(8, float) FP8 or (4, int) INT4")


def _ct_activations(a: dict | None, at: str, where: str) -> ActivationScheme:
    if a is None:
        raise _unsupported(where, at, None, "FP8 input activations (W8A8): dynamic per token or static per tensor")
    if (a.get("num_bits"), a.get("type")) != (8, "float"):
        raise _unsupported(where, f"{at} num_bits/type", (a.get("num_bits"), a.get("type")), "(8, float)")
    if a.get("dynamic") is True and a.get("strategy") == "token":
        return ActivationScheme(dynamic=True, strategy="token")
    if a.get("dynamic") is False and a.get("strategy") == "tensor":
        return ActivationScheme(dynamic=False, strategy="tensor")
    raise _unsupported(where, f"{at} dynamic/strategy", (a.get("dynamic"), a.get("strategy")),
                       "(true, token) or (false, tensor)")


def _ct_kv_scheme(kv: dict | None, where: str) -> bool:
    if kv is None:
        return False
    got = (kv.get("num_bits"), kv.get("type"), kv.get("strategy"), kv.get("dynamic", False))
    if got != (8, "float", "tensor", False):
        raise _unsupported(where, "quantization_config.kv_cache_scheme (num_bits, type, strategy, dynamic)",
                           got, "(8, float, tensor, false): one static FP8 scale per layer for K and for V")
    return True


# -- vLLM's own fp8 config and ModelOpt ------------------------------------------------------------
def _vllm_fp8(q: dict, where: str) -> QuantSpec:
    if q.get("weight_block_size"):
        raise _unsupported(where, "quantization_config.weight_block_size", q["weight_block_size"],
                           "null (per-tensor weight scales)")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise _unsupported(where, "quantization_config.activation_scheme", scheme, "dynamic, static")
    return QuantSpec(
        method="fp8", source="fp8", weights=WeightScheme(8, "float", "tensor"),
        activations=ActivationScheme(dynamic=scheme == "dynamic",
                                     strategy="token" if scheme == "dynamic" else "tensor"),
        serialized=True, ignore=tuple(q.get("ignored_layers") or ("lm_head",)),
        kv_cache=bool(q.get("kv_cache_scheme")), checkpoint_format="fp8",
    )


_MODELOPT_ALGOS = {
    "FP8": (WeightScheme(8, "float", "tensor"), ActivationScheme(dynamic=False, strategy="tensor")),
    "FP8_PER_CHANNEL_PER_TOKEN": (WeightScheme(8, "float", "channel"), ActivationScheme(dynamic=True)),
}


def _modelopt(q: dict, where: str) -> QuantSpec:
    algo = q.get("quant_algo")
    if algo not in _MODELOPT_ALGOS:
        raise _unsupported(where, "quant_algo", algo, ", ".join(_MODELOPT_ALGOS))
    kv = q.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise _unsupported(where, "kv_cache_quant_algo", kv, "FP8 or null")
    weights, acts = _MODELOPT_ALGOS[algo]
    return QuantSpec(
        method="fp8", source="modelopt", weights=weights, activations=acts, serialized=True,
        ignore=tuple(q.get("exclude_modules") or ("lm_head",)), kv_cache=kv == "FP8",
        checkpoint_format=algo,
    )


# -- AutoAWQ -------------------------------------------------------------------------------------
def _awq(q: dict, where: str) -> QuantSpec:
    bits = q.get("bits", q.get("w_bit"))
    group = q.get("group_size", q.get("q_group_size"))
    version = str(q.get("version", "gemm")).lower()
    if bits != 4:
        raise _unsupported(where, "quantization_config.bits", bits, "4")
    if not isinstance(group, int) or (group < 1 and group != -1):
        raise _unsupported(where, "quantization_config.group_size", group,
                           "a positive int, e.g. 128, or -1 (per channel)")
    if version != "gemm":
        raise _unsupported(where, "quantization_config.version", version, "gemm (AutoAWQ's GEMM layout)")
    zero_point = bool(q.get("zero_point", True))
    return QuantSpec(
        method="awq", source="awq",
        weights=WeightScheme(4, "int", "channel" if group == -1 else "group",
                             group_size=None if group == -1 else group, symmetric=not zero_point),
        activations=None, serialized=True, ignore=tuple(q.get("modules_to_not_convert") or ("lm_head",)),
        checkpoint_format="gemm", extra={"zero_point": zero_point, "version": version},
    )
