"""W4A16 unpacking: 4-bit codes to numbers inside the kernels of taxiway_kernels/w4a16.py.

Decode is bandwidth-bound only if the SMs dequantize faster than HBM delivers codes: an H200 at
4.8 TB/s feeds each of 132 SMs ~37 codes per clock, against 128 thread-instructions issued per
clock, so every instruction per code counts, and int->float conversion (I2F, a fraction of the
FP32 rate on Hopper) must go. The default (`unpack="fast"`) never converts: a code OR-ed into the
mantissa of 2^23 (0x4B000000) is the float 2^23 + code, exactly, and one FADD removes 2^23.
- gemv: codes masked in place, (p & 0xF << 4j) | 0x4B000000 is 2^23 + code * 16^j, so one LOP3
  (inline PTX, as ptxas splits the and/or), one FADD and one FFMA with x * 16^-j (exact) per code,
  and one shift per word for its high half.
- mm on bf16 / fp16: two codes per 32-bit register (Marlin / FasterTransformer):
  (p >> 4j) & 0x000F000F | 0x43004300 is the bf16 pair 128 + code (fp16: 0x64006400, 1024 +
  code); sub.bf16x2 (128 + zero) is exact and mul.bf16x2 scale rounds once, the same value as
  the reference's (code - zero) * scale rounded to x's dtype. Four instructions per two codes.
The CPU interpreter cannot run inline PTX: it runs the same arithmetic in plain Triton (MAGIC).
`unpack="i2f"` keeps the converting kernels for comparison (bench/w4a16.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

UNPACK_MODES = ("fast", "i2f")  # W4A16Config.unpack
# How a kernel turns codes into numbers (its UNPACK constexpr): I2F converts each code with an
# int->float conversion (slow on Hopper); MAGIC ORs it into the mantissa of the float32 2^23 and
# subtracts 2^23, in plain Triton (what the CPU interpreter runs); ASM is the same in inline PTX
# (CUDA): one LOP3 per code in the gemv, and in the mm path on 16-bit x two codes per 32-bit
# register (bf16 / fp16 pairs).
I2F, MAGIC, ASM = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def unpack8(p, R: tl.constexpr, C: tl.constexpr):
    """p: [R, C] int32 words -> [R, 8 C] int32 codes, column 8 c + j = nibble j of word c."""
    n0, n1, n2, n3 = p & 0xF, (p >> 4) & 0xF, (p >> 8) & 0xF, (p >> 12) & 0xF
    n4, n5, n6, n7 = (p >> 16) & 0xF, (p >> 20) & 0xF, (p >> 24) & 0xF, (p >> 28) & 0xF
    # join puts its pair in a new minor dim; nested three deep, position 4a + 2b + c holds the
    # argument reached by (c, b, a), so the nibbles go in bit-reversed order to come out in order.
    w = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(w, (R, 8 * C))


@triton.jit
def magic_f32(bits):
    """int32 bits holding v < 2^23 in the low 23 bits -> float32 2^23 + v, exactly (no I2F)."""
    return (bits | 0x4B000000).to(tl.float32, bitcast=True)


def _pairs_asm(magic: int, sub: str, mul: str) -> str:
    """PTX: word $4 -> four registers, register j = the 16-bit pair (nibble j, nibble j + 4) as
    ((128 or 1024) + code - ((128 or 1024) + zero)) * scale; $6 = scale pair, $7 = biased zero pair.
    The OR of a nibble into the mantissa of 128 (bf16) or 1024 (fp16) is exact, so is the sub;
    the mul rounds once, as the reference's (code - zero) * scale rounded to x's dtype."""
    lines = [".reg .b32 q<4>;", "mov.b32 q0, $4;"]
    lines += [f"shr.u32 q{j}, $4, {4 * j};" for j in (1, 2, 3)]
    for j in range(4):
        lines += [f"lop3.b32 q{j}, q{j}, 0x000F000F, {magic:#x}, 0xEA;",  # (a & b) | c
                  f"{sub} q{j}, q{j}, $7;", f"{mul} ${j}, q{j}, $6;"]
    return "{\n" + "\n".join(lines) + "\n}"


_ASM_BF16 = tl.constexpr(_pairs_asm(0x43004300, "sub.rn.bf16x2", "mul.rn.bf16x2"))  # sm_90
_ASM_F16 = tl.constexpr(_pairs_asm(0x64006400, "sub.rn.f16x2", "mul.rn.f16x2"))


@triton.jit
def _dequant_pairs(p, s, z, R: tl.constexpr, C: tl.constexpr):
    """p [R, C] int32, s [R] bf16 / fp16, z [R] int32 zero codes -> [R, 8 C] (code - z) * s in
    s's dtype, two codes per instruction (CUDA only: inline PTX)."""
    # Each asm instance takes one element pair of join(p, p) (both the same word: $4 = $5) and
    # writes 16-bit pairs, element 0 = nibble j, element 1 = nibble j + 4 of that word; 16-bit
    # inputs come packed in pairs (scale, scale) and (bias + z, bias + z).
    BF16: tl.constexpr = s.dtype == tl.bfloat16
    BIAS: tl.constexpr = 128.0 if BF16 else 1024.0
    PTX: tl.constexpr = _ASM_BF16 if BF16 else _ASM_F16
    zb = (z.to(tl.float32) + BIAS).to(s.dtype)[:, None, None]  # exact
    t0, t1, t2, t3 = tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r,r,r,r", [tl.join(p, p), s[:, None, None], zb],
                                               dtype=(s.dtype,) * 4, is_pure=True, pack=2)
    return _pairs_to_tile(t0, t1, t2, t3, R, C)


@triton.jit
def _pairs_to_tile(t0, t1, t2, t3, R: tl.constexpr, C: tl.constexpr):
    """t_j [R, C, 2] = (nibble j, nibble j + 4) of each word -> [R, 8 C] in pair order (pair_order)."""
    t01 = tl.permute(tl.join(t0, t1), (0, 1, 3, 2))  # [R, C, j, h]
    t23 = tl.permute(tl.join(t2, t3), (0, 1, 3, 2))
    return tl.reshape(tl.permute(tl.join(t01, t23), (0, 1, 4, 2, 3)), (R, 8 * C))  # [R, C, J, j, h]


@triton.jit
def pair_order(x, R: tl.constexpr, K: tl.constexpr):
    """x [R, K] in k order -> the columns in the order of the ASM weight tile: column 8 c + 2 j + h
    holds k = 8 c + j + 4 h (j < 4, h < 2), the two codes of one bf16x2 / f16x2 register side by side."""
    return tl.reshape(tl.permute(tl.reshape(x, (R, K // 8, 2, 2, 2)), (0, 1, 3, 4, 2)), (R, K))


@triton.jit
def dequant_tile(p, s, z, R: tl.constexpr, C: tl.constexpr, UNPACK: tl.constexpr):
    """p [R, C] int32 words, s [R] scales (x's dtype), z [R] int32 zero codes -> [R, 8 C] weights
    (code - z) * s rounded to s's dtype: in k order under I2F, else in pair order (pair_order),
    in which ASM writes two codes per register and MAGIC (its plain-Triton twin) the same."""
    if UNPACK == ASM:
        w = _dequant_pairs(p, s, z, R, C)
    elif UNPACK == MAGIC:
        off = (8388608.0 + z.to(tl.float32))[:, None]  # 2^23 + zero
        sf = s.to(tl.float32)[:, None]
        t0 = tl.join(_magic_w(p, 0, off, sf), _magic_w(p, 16, off, sf))
        t1 = tl.join(_magic_w(p, 4, off, sf), _magic_w(p, 20, off, sf))
        t2 = tl.join(_magic_w(p, 8, off, sf), _magic_w(p, 24, off, sf))
        t3 = tl.join(_magic_w(p, 12, off, sf), _magic_w(p, 28, off, sf))
        w = _pairs_to_tile(t0, t1, t2, t3, R, C).to(s.dtype)
    else:
        q = unpack8(p, R, C).to(tl.float32) - z.to(tl.float32)[:, None]
        w = (q * s.to(tl.float32)[:, None]).to(s.dtype)
    return w


@triton.jit
def _magic_w(p, SHIFT: tl.constexpr, off, sf):
    """(code at bit SHIFT of p - zero) * scale in float32, the code converted without I2F."""
    return (magic_f32((p >> SHIFT) & 0xF) - off) * sf


_ASM_IN_PLACE = tl.constexpr("{\n.reg .b32 h;\nshr.u32 h, $8, 16;\n" + "".join(
    f"lop3.b32 ${4 * half + j}, {'h' if half else '$8'}, {0xF << 4 * j:#x}, 0x4B000000, 0xEA;\n"
    for half in (0, 1) for j in range(4)) + "}")


@triton.jit
def _nibbles_in_place(p, UNPACK: tl.constexpr):
    """p int32 words -> 8 float32 tensors 2^23 + code * 16^j: c_j of nibble j (low half of p),
    c_{4+j} of nibble 4 + j (the high half), for j < 4. One LOP3 each under ASM."""
    if UNPACK == ASM:
        c = tl.inline_asm_elementwise(_ASM_IN_PLACE, "=r," * 8 + "r", [p], dtype=(tl.int32,) * 8,
                                      is_pure=True, pack=1)
        f = tl.float32
        return (c[0].to(f, bitcast=True), c[1].to(f, bitcast=True), c[2].to(f, bitcast=True),
                c[3].to(f, bitcast=True), c[4].to(f, bitcast=True), c[5].to(f, bitcast=True),
                c[6].to(f, bitcast=True), c[7].to(f, bitcast=True))
    else:
        hi = p >> 16
        return (magic_f32(p & 0xF), magic_f32(p & 0xF0), magic_f32(p & 0xF00), magic_f32(p & 0xF000),
                magic_f32(hi & 0xF), magic_f32(hi & 0xF0), magic_f32(hi & 0xF00), magic_f32(hi & 0xF000))


@triton.jit
def _split8(xt):
    """xt [W, 8] -> its eight columns, each [W]."""
    W: tl.constexpr = xt.shape[0]
    a, b = tl.split(tl.reshape(xt, (W, 2, 2, 2)))  # column 4 i + 2 j + l: l = 0 / 1
    a0, a1 = tl.split(a)  # j = 0 / 1, l = 0
    b0, b1 = tl.split(b)
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def word_dots(p, xt, UNPACK: tl.constexpr):
    """p [BN, W] int32 words; xt [W, 8] float32, the x of each word's 8 codes. Returns
    (sum_j code_j * x_j [BN, W], sum_j x_j [W]) over the 8 codes of each word, in float32. The x
    side is computed once per word and shared by the BN rows."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(xt)
    xsum = tl.sum(xt, axis=1)
    if UNPACK == I2F:
        dots = (p & 0xF).to(tl.float32) * x0[None, :]
        dots += ((p >> 4) & 0xF).to(tl.float32) * x1[None, :]
        dots += ((p >> 8) & 0xF).to(tl.float32) * x2[None, :]
        dots += ((p >> 12) & 0xF).to(tl.float32) * x3[None, :]
        dots += ((p >> 16) & 0xF).to(tl.float32) * x4[None, :]
        dots += ((p >> 20) & 0xF).to(tl.float32) * x5[None, :]
        dots += ((p >> 24) & 0xF).to(tl.float32) * x6[None, :]
        dots += ((p >> 28) & 0xF).to(tl.float32) * x7[None, :]
    else:
        # Codes masked in place: nibble j (j < 4) of the low half, or of hi = p >> 16, is
        # code * 16^j in a float32 mantissa: one LOP3, one FADD, one FFMA with x * 16^-j (exact).
        c0, c1, c2, c3, c4, c5, c6, c7 = _nibbles_in_place(p, UNPACK)
        dots = (c0 - 8388608.0) * x0[None, :]
        dots += (c4 - 8388608.0) * x4[None, :]
        dots += (c1 - 8388608.0) * (x1 * 0.0625)[None, :]
        dots += (c5 - 8388608.0) * (x5 * 0.0625)[None, :]
        dots += (c2 - 8388608.0) * (x2 * 0.00390625)[None, :]
        dots += (c6 - 8388608.0) * (x6 * 0.00390625)[None, :]
        dots += (c3 - 8388608.0) * (x3 * 0.000244140625)[None, :]
        dots += (c7 - 8388608.0) * (x7 * 0.000244140625)[None, :]
    return dots, xsum
