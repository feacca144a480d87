"""Building the model on its device and filling it: from safetensors checkpoints (16/32-bit or
pre-quantized), or random (dummy)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.model import CausalLM
from gpu_engine.parallel.sharding import check_tensor_parallel
from gpu_engine.parallel.state import TPShard
from gpu_engine.quant.kv import kv_scale_target, scale_value
from gpu_engine.quant.linear import DenseLinear, LinearMethod, QuantLinear, quant_linears
from gpu_engine.quant.methods import linear_method
from gpu_engine.quant.spec import QuantSpec

log = logging.getLogger(__name__)

# HF tensor names that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                method: LinearMethod | None = None, shard: TPShard = TPShard()) -> CausalLM:
    """The model (one tensor-parallel rank's share of it) with uninitialised parameters, allocated
    directly on `device`: `dtype` for 16/32-bit tensors, the method's own dtypes (FP8...) for
    quantized linears."""
    method = method or LinearMethod(None, dtype)
    if method.dtype != dtype:
        raise ValueError(f"the linear method makes {method.dtype} linears, the model is {dtype}")
    check_tensor_parallel(cfg, shard.world)
    with torch.device("meta"):
        model = CausalLM(cfg, method, shard)
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _plain_targets(cfg: ModelConfig) -> dict[str, str]:
    """HF name -> our parameter name, for the tensors outside the decoder layers' linears."""
    out = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm"}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        out[f"{hf}input_layernorm.weight"] = f"{me}input_layernorm"
        out[f"{hf}post_attention_layernorm.weight"] = f"{me}post_attention_layernorm"
        if cfg.qk_norm:
            out[f"{hf}self_attn.q_norm.weight"] = f"{me}q_norm"
            out[f"{hf}self_attn.k_norm.weight"] = f"{me}k_norm"
    return out


def _linear_parts(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """HF module name -> (our linear's name, part index): q/k/v and gate/up are fused at load."""
    out: dict[str, tuple[str, int]] = {}
    for i in range(cfg.num_layers):
        hf, me = f"model.layers.{i}.", f"layers.{i}."
        parts = {"self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1),
                 "self_attn.v_proj": ("qkv_proj", 2), "self_attn.o_proj": ("o_proj", 0),
                 "mlp.gate_proj": ("gate_up_proj", 0), "mlp.up_proj": ("gate_up_proj", 1),
                 "mlp.down_proj": ("down_proj", 0)}
        for src, (dst, part) in parts.items():
            out[hf + src] = (me + dst, part)
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded through an index, or all of them)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index} is malformed: {exc!r}") from exc
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards named in the index are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {pickles}: pickled checkpoints are never loaded; convert them to safetensors)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors files in {folder}{hint}")
    return files


class _Loader:
    """Routes each checkpoint tensor: plain tensors by name, linears' tensors to module.load, KV
    scales to their layer; knows which names the config (and the quantization) expects."""

    def __init__(self, model: CausalLM, cfg: ModelConfig, kv_fp8: bool):
        self.model, self.cfg, self.kv_fp8 = model, cfg, kv_fp8
        self.plain = _plain_targets(cfg)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        modules = dict(model.named_modules())
        self.linears = {hf: (modules[me], part) for hf, (me, part) in _linear_parts(cfg).items()}
        self.expected = dict.fromkeys(self.plain, "")
        for hf, (mod, _) in self.linears.items():
            for kind, what in mod.expected().items():
                self.expected[f"{hf}.{kind}"] = what
        self.seen: set[str] = set()
        self.unused_kv_scales: list[str] = []
        self.vocab_rows = model.lm_head.tp_shard  # the embedding's and LM head's rows of this rank
        self.shard = model.shard

    def index(self, name: str, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The slice of checkpoint tensor `name` (of `shape`) this rank holds; everything at world 1."""
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return self.vocab_rows.index(shape, (0, 1), 0, name)
        module, part, kind = self._linear_of(name)
        if module is None:
            return tuple(slice(None) for _ in shape)  # norms, KV scales: replicated
        return module.tp_shard.index(shape, module.shard_axes(kind), part, name)

    def _linear_of(self, name: str) -> tuple[QuantLinear | None, int, str]:
        prefix, _, kind = name.rpartition(".")
        if kv_scale_target(name) is not None or prefix not in self.linears:
            return None, 0, kind
        module, part = self.linears[prefix]
        return module, part, kind

    def read(self, f, name: str) -> torch.Tensor:
        """This rank's slice of a tensor: only it leaves the file (safetensors get_slice)."""
        view = f.get_slice(name)
        shape = tuple(view.get_shape())
        if not shape:
            return f.get_tensor(name)
        tensor = view[self.index(name, shape)]
        module, _, kind = self._linear_of(name)
        if kind == "bias" and module is not None and module.tp_shard.style == "row" and self.shard.rank:
            tensor = torch.zeros_like(tensor)  # a row-parallel bias is added once, by rank 0's share
        return tensor

    def load(self, name: str, tensor: torch.Tensor, file: str) -> None:
        if name in self.plain:
            param = self.params[self.plain[name]]
            want = tuple(param.shape)
            if tuple(tensor.shape) != want:
                raise ModelLoadError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"but config.json implies {want}")
            param.data.copy_(tensor.to(param.dtype))
        elif kv_scale_target(name) is not None:  # before linears: ModelOpt's k_proj.k_scale
            self._kv_scale(name, tensor)
        elif name.rpartition(".")[0] in self.linears:
            prefix, _, kind = name.rpartition(".")
            module, part = self.linears[prefix]
            module.load(part, kind, tensor, name)
        else:
            raise ModelLoadError(f"{file}: tensor {name!r} does not belong to a {self.cfg.architecture} "
                                 f"with this config")
        self.seen.add(name)

    def _kv_scale(self, name: str, tensor: torch.Tensor) -> None:
        layer, which = kv_scale_target(name)
        if layer >= self.cfg.num_layers:
            raise ModelLoadError(f"tensor {name!r}: layer {layer} of a {self.cfg.num_layers}-layer model")
        value = scale_value(tensor, name)
        if not self.kv_fp8:
            self.unused_kv_scales.append(name)
            return
        scales = list(self.model.layers[layer].kv_scale)
        scales[which] = value
        self.model.layers[layer].kv_scale = (scales[0], scales[1])

    def finish(self, folder: Path) -> None:
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            shown = ", ".join(n + (f" ({self.expected[n]})" if self.expected[n] else "") for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ModelLoadError(f"checkpoint in {folder} lacks tensors the config needs: {shown}{more}")
        for module in quant_linears(self.model):
            module.process_after_loading()
        if self.unused_kv_scales:
            log.warning("the checkpoint carries FP8 KV-cache scales (%s, ...) but kv_cache_dtype is 'auto': "
                        "the cache stays in the model's dtype and they are unused; pass kv_cache_dtype='fp8'",
                        self.unused_kv_scales[0])


def load_checkpoint(model: CausalLM, folder: Path, cfg: ModelConfig, progress: bool = True,
                    kv_fp8: bool = False) -> None:
    """Copy every tensor of the checkpoint into the model, checking names and shapes against the
    config (and the quantization its linears were made with). kv_fp8: take the checkpoint's
    KV-cache scales (else they are reported unused)."""
    loader = _Loader(model, cfg, kv_fp8)
    files = checkpoint_files(folder)
    with tqdm(total=len(loader.expected), desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue
                    loader.load(name, loader.read(f, name), path.name)
                    bar.update(1)
    loader.finish(folder)


def load_model(cfg: ModelConfig, folder: Path | None, dtype: torch.dtype, device: torch.device,
               spec: QuantSpec | None, *, load_format: str, seed: int, kv_fp8: bool,
               shard: TPShard = TPShard(), progress: bool = True) -> CausalLM:
    """One rank's model, built on `device` and filled: from the checkpoint folder (only this rank's
    slices are read), or random (load_format "dummy", folder None for a preset)."""
    method = linear_method(spec, dtype)
    method.check_device(device)
    model = build_model(cfg, dtype, device, method, shard)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_checkpoint(model, folder, cfg, progress=progress, kv_fp8=kv_fp8)
    return model


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Random weights made on the model's device: N(0, 0.02) matrices, unit norms, zero biases;
    quantized linears make theirs directly in their own format (no 16-bit copy of the model)."""
    gen = torch.Generator(device=model.norm.device).manual_seed(seed)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and not isinstance(m, DenseLinear)}
    for name, module in model.named_modules():
        if name in quantized:
            module.init_dummy(gen)
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] in quantized:
            continue
        if param.dim() == 1:
            if name.endswith("bias"):
                param.data.zero_()
            else:
                param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=gen)
