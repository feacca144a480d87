"""taxiway's own AWQ calibration: activation-aware per-channel scales, optional clipping, then
group-wise INT4 (Lin et al., "AWQ", 2023; the search follows AutoAWQ's).

Layer by layer, on calibration text run through the unquantized model:
1. collect the inputs of each linear group (qkv, o, gate_up, down) from the float layer;
2. per group, grid-search alpha in [0, 1): s = mean|x|^alpha / mean|w_normalized|^(1 - alpha),
   keeping the s whose fake-quantized weights Q(W s) / s give the smallest mean squared error of
   the block the group feeds (attention, o_proj, MLP, down_proj);
3. fold s into what precedes the group: 1 / s into the RMSNorm weight (qkv, gate_up), into v's
   rows (o, only without grouped-query attention, as AutoAWQ) or up's rows (down); W *= s;
4. optionally search, per output row and group, the clipping range that minimises the group's
   output error (all linears but q and k), then round to INT4: to nearest, or with GPTQ's error
   compensation on the inputs the scaled linear sees (gptq.py).
The next layer sees the float layer's output. The result is a standard checkpoint (awq_export).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gpu_engine.config import ModelConfig
from gpu_engine.model import DecoderLayer, rope_cos_sin_cache
from gpu_engine.quant import awq_forward as AF
from gpu_engine.quant.awq_export import OUT_FORMATS, write_checkpoint
from gpu_engine.quant.calib_text import calibration_text, token_windows
from gpu_engine.quant.gptq import DAMP, gptq_int4, hessian
from gpu_engine.quant.int4 import Int4Weight, fake_quantize_int4, quantize_int4
from gpu_engine.tokenizer import Tokenizer
from gpu_engine.weights import build_model, load_checkpoint


_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class AwqSettings:
    """How quantize_awq calibrates (defaults: AutoAWQ's search on a CPU-sized calibration set)."""

    group_size: int = 128
    zero_point: bool = True
    num_samples: int = 32
    """Calibration windows of seq_len tokens (activation statistics use all of them)."""
    seq_len: int = 256
    loss_tokens: int = 1024
    """Tokens (whole windows) the scale search evaluates each candidate's block output on."""
    clip_tokens: int = 512
    """Tokens the clipping search evaluates on."""
    n_grid: int = 20
    clip: bool = True
    duo_scaling: bool = True
    """s = x^a / w^(1 - a) (AutoAWQ's default); False: s = x^a (the paper's)."""
    quantized_inputs: bool = True
    """Each layer calibrates on the outputs of the layers before it as quantized (llm-compressor's
    sequential pipeline); False: on the float model's outputs (AutoAWQ)."""
    gptq: bool = True
    """Round with GPTQ (gptq.py) on each linear's calibration inputs as the scaled float layer
    computes them; False: round to nearest. bench/awq_quality.py measures both (docs/awq.md)."""
    gptq_static_groups: bool = True
    """GPTQ takes each group's scale and zero from the clipped weights before it runs (keeps the
    clipping search's ranges); False: from the updated weights as each group is reached."""
    gptq_act_order: bool = True
    """GPTQ rounds the input channels in order of decreasing activation energy (needs static groups)."""
    gptq_damp: float = DAMP
    """GPTQ's dampening (percdamp): H += gptq_damp * mean(diag H) * I (gptq.DAMP says why not 0.01)."""

    def __post_init__(self) -> None:
        if self.group_size < 8 or self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        for name in ("num_samples", "seq_len", "loss_tokens", "clip_tokens", "n_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be positive, got {self.gptq_damp}")
        if self.gptq_act_order and not self.gptq_static_groups:
            raise ValueError("gptq_act_order needs gptq_static_groups=True (act-ordered dynamic groups "
                             "are not contiguous, and no INT4 format here stores a g_idx)")


def quantize_awq(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    group_size: int = 128,
    zero_point: bool = True,
    calib_text: str | None = None,
    calib_ids: torch.Tensor | None = None,
    num_samples: int = 32,
    seq_len: int = 256,
    out_format: str = "autoawq",
    device: str | torch.device | None = None,
    progress: bool = True,
    **settings,
) -> Path:
    """AWQ-quantize the HF checkpoint in model_dir to INT4 and write it to out_dir.

    calib_text: None for the default (calib_text.calibration_text(), CPython's Language
    Reference); calib_ids: token ids [num_samples, seq_len] instead of text. out_format: "autoawq" (GEMM layout, float16) or "compressed-tensors"
    (pack-quantized). device: None for cuda when available, else cpu. Extra keyword arguments are
    AwqSettings fields (n_grid, clip, loss_tokens, ...). Returns out_dir.
    """
    if out_format not in OUT_FORMATS:
        raise ValueError(f"out_format must be one of {OUT_FORMATS}, got {out_format!r}")
    st = AwqSettings(group_size=group_size, zero_point=zero_point, num_samples=num_samples,
                     seq_len=seq_len, **settings)
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_folder(model_dir)
    _check_group_size(cfg, st.group_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg, torch.float32, dev)
    load_checkpoint(model, model_dir, cfg, progress=progress)
    if calib_ids is not None:
        if calib_text is not None:
            raise ValueError("give calib_text or calib_ids, not both")
        windows = token_windows(calib_ids.reshape(-1).tolist(), st.num_samples, st.seq_len).to(dev)
    else:
        tok = Tokenizer.from_folder(model_dir)
        text = calibration_text() if calib_text is None else calib_text
        windows = token_windows(tok.encode(text, add_special_tokens=False), st.num_samples, st.seq_len).to(dev)
    quantized = calibrate(model.layers, model.embed_tokens(windows), rope_cos_sin_cache(cfg, st.seq_len, dev),
                          st, progress=progress)
    return write_checkpoint(model, cfg, quantized, model_dir, Path(out_dir), fmt=out_format,
                            group_size=st.group_size, zero_point=st.zero_point)


def _check_group_size(cfg: ModelConfig, g: int) -> None:
    for what, k in (("hidden_size", cfg.hidden_size), ("num_heads * head_dim", cfg.q_size),
                    ("intermediate_size", cfg.intermediate_size)):
        if k % g:
            hint = next((c for c in (128, 64, 32) if all(
                d % c == 0 for d in (cfg.hidden_size, cfg.q_size, cfg.intermediate_size))), None)
            raise ValueError(f"group_size {g} does not divide {what} {k}"
                             + (f"; group_size {hint} divides every linear's input" if hint else ""))


@torch.no_grad()
def calibrate(
    layers: nn.ModuleList,
    stream: torch.Tensor,  # [B, S, hidden] float32: the embeddings of the calibration windows
    cos_sin: torch.Tensor,  # [S, head_dim] float32
    st: AwqSettings,
    progress: bool = True,
) -> list[dict[str, Int4Weight]]:
    """Scale, clip and quantize every layer in place; returns each layer's INT4 linears by name
    (qkv_proj, o_proj, gate_up_proj, down_proj). The norms hold the folded scales; the linears the
    scaled weights (dequantized from INT4 with quantized_inputs)."""
    out = []
    for layer in tqdm(layers, desc="AWQ", unit="layer", disable=not progress):
        acts = AF.run_layer(layer, stream, cos_sin)
        _scale_layer(layer, acts, cos_sin, st)
        if st.clip:
            _clip_layer(layer, acts, st)
        out.append(_round_layer(layer, acts, st))
        if st.quantized_inputs:
            for name in _LINEARS:
                getattr(layer, name).weight.data = out[-1][name].dequantize(torch.float32)
            stream = AF.run_layer(layer, stream, cos_sin).out
        else:
            stream = acts.out
    return out


def _round_layer(layer: DecoderLayer, a: AF.LayerInputs, st: AwqSettings) -> dict[str, Int4Weight]:
    """Each linear of the (scaled, clipped) layer as INT4, GPTQ on the inputs it sees or to nearest."""
    inputs = dict(qkv_proj=a.qkv_in, o_proj=a.o_in, gate_up_proj=a.gate_up_in, down_proj=a.down_in)
    out = {}
    for name in _LINEARS:
        w = getattr(layer, name).weight.data
        if st.gptq:
            out[name] = gptq_int4(w, hessian(inputs[name]), st.group_size, st.zero_point,
                                  static_groups=st.gptq_static_groups, act_order=st.gptq_act_order,
                                  percdamp=st.gptq_damp)
        else:
            out[name] = quantize_int4(w, st.group_size, st.zero_point)
    return out


def _scale_layer(layer: DecoderLayer, a: AF.LayerInputs, cos_sin: torch.Tensor, st: AwqSettings) -> None:
    """Search the four groups' scales on the float layer, then fold them all (a's inputs are divided
    by their scales too, so the clipping search sees what the scaled linears will)."""
    cfg = layer.cfg
    nb = max(1, min(a.qkv_in.shape[0], st.loss_tokens // a.qkv_in.shape[1]))  # whole windows
    inter = cfg.intermediate_size
    searches = [
        ("qkv", a.qkv_in, layer.qkv_proj, lambda: AF.attention_block(layer, a.qkv_in[:nb], cos_sin), a.attn_out),
        ("gate_up", a.gate_up_in, layer.gate_up_proj, lambda: AF.mlp_block(layer, a.gate_up_in[:nb]), a.mlp_out),
        ("down", a.down_in, layer.down_proj, lambda: layer.down_proj(a.down_in[:nb]), a.mlp_out),
    ]
    if cfg.num_heads == cfg.num_kv_heads:  # v's output channels are o's input channels
        searches.append(("o", a.o_in, layer.o_proj, lambda: layer.o_proj(a.o_in[:nb]), a.attn_out))
    scales = {name: _search_scale(x, lin, block, target[:nb], st) for name, x, lin, block, target in searches}
    _fold(layer.input_layernorm, None, scales["qkv"], layer.qkv_proj)
    a.qkv_in /= scales["qkv"]
    _fold(layer.post_attention_layernorm, None, scales["gate_up"], layer.gate_up_proj)
    a.gate_up_in /= scales["gate_up"]
    _fold(layer.gate_up_proj, slice(inter, 2 * inter), scales["down"], layer.down_proj)
    a.down_in /= scales["down"]
    if "o" in scales:
        v = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
        _fold(layer.qkv_proj, v, scales["o"], layer.o_proj)
        a.o_in /= scales["o"]


def _search_scale(
    x: torch.Tensor,  # [B, S, K] the group's input
    linear: nn.Linear,
    block: Callable[[], torch.Tensor],  # output of the block the group feeds, on the loss windows
    target: torch.Tensor,  # the float block's output on the same windows
    st: AwqSettings,
) -> torch.Tensor:  # [K] float32
    w0 = linear.weight.data.clone()
    g = st.group_size
    wn = w0.abs().view(-1, g)
    w_mean = (wn / (wn.amax(dim=1, keepdim=True) + 1e-6)).view(w0.shape).mean(0)
    x_mean = x.abs().reshape(-1, x.shape[-1]).float().mean(0)
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for i in range(st.n_grid):
        alpha = i / st.n_grid
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if st.duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
        linear.weight.data = fake_quantize_int4(w0 * s, g, st.zero_point) / s
        loss = float((block() - target).float().pow(2).mean())
        if loss < best:
            best, best_s = loss, s
    linear.weight.data = w0
    return best_s


def _fold(prev: nn.Parameter | nn.Module, rows: slice | None, s: torch.Tensor, linear: nn.Module) -> None:
    """prev's output channels (a norm weight, or `rows` of a linear) /= s; linear's inputs *= s."""
    if isinstance(prev, torch.Tensor):
        prev.data /= s
    else:
        prev.weight.data[rows] /= s[:, None]
        if prev.bias is not None:
            prev.bias.data[rows] /= s
    linear.weight.data *= s[None, :]


def _clip_layer(layer: DecoderLayer, a: AF.LayerInputs, st: AwqSettings) -> None:
    """Clip every linear but q and k (their errors are amplified by the attention softmax)."""
    cfg = layer.cfg
    v = slice(cfg.q_size + cfg.kv_size, cfg.q_size + 2 * cfg.kv_size)
    for lin, x, rows in ((layer.qkv_proj, a.qkv_in, v), (layer.o_proj, a.o_in, slice(None)),
                         (layer.gate_up_proj, a.gate_up_in, slice(None)), (layer.down_proj, a.down_in, slice(None))):
        w = lin.weight.data[rows]
        lin.weight.data[rows] = _clip(w, x.reshape(-1, x.shape[-1]), st)


def _clip(w: torch.Tensor, x: torch.Tensor, st: AwqSettings, max_shrink: float = 0.5) -> torch.Tensor:
    """w [N, K] clamped per (row, group) to the range whose quantized weights give the group's
    outputs on x [T, K] closest to the float ones. AutoAWQ's candidates first (max|w| shrunk by
    0, 1/n_grid, ... max_shrink, clamped symmetrically); with zero points, each end is then
    shrunk on its own from there. The output error of a group is d.T H d, d = q - w, with
    H = x_g.T x_g / T the group's input Gram matrix, so a candidate costs N K g, not N K T."""
    g = st.group_size
    n, k = w.shape
    x = x[:: max(1, x.shape[0] // st.clip_tokens)][: st.clip_tokens].float()
    xg = x.view(-1, k // g, g).transpose(0, 1)  # [G, T, g]
    gram = torch.bmm(xg.transpose(1, 2), xg) / x.shape[0]  # [G, g, g]
    shrinks = [1 - i / st.n_grid for i in range(int(max_shrink * st.n_grid))]
    out = torch.empty_like(w)
    for r0 in range(0, n, 256):
        wg = w[r0:r0 + 256].float().view(-1, k // g, g)  # [R, G, g]
        top = wg.abs().amax(-1, keepdim=True)  # [R, G, 1]
        lo, hi = -top, top
        best_err = torch.full(top.shape, float("inf"), device=w.device)
        best_lo, best_hi = lo.clone(), hi.clone()

        def consider(c_lo: torch.Tensor, c_hi: torch.Tensor) -> None:
            nonlocal best_err, best_lo, best_hi
            q = fake_quantize_int4(torch.maximum(torch.minimum(wg, c_hi), c_lo).view(-1, k), g, st.zero_point)
            d = (q.view_as(wg) - wg).transpose(0, 1)  # [G, R, g]
            err = (torch.bmm(d, gram) * d).sum(-1).t().unsqueeze(-1)  # [R, G, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, c_lo, best_lo)
            best_hi = torch.where(better, c_hi, best_hi)

        for f in shrinks:
            consider(lo * f, hi * f)
        if st.zero_point:
            wmin, wmax = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
            base_lo, base_hi = best_lo.clone(), best_hi.clone()
            for f in shrinks[1:]:
                consider(torch.maximum(base_lo, wmin) * f, base_hi)
            base_lo = best_lo.clone()
            for f in shrinks[1:]:
                consider(base_lo, torch.minimum(base_hi, wmax) * f)
        out[r0:r0 + 256] = torch.maximum(torch.minimum(wg, best_hi), best_lo).view(-1, k).to(w.dtype)
    return out
