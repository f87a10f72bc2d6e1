"""Tiny GGUF files written with gguf's own GGUFWriter, and ggml's block formats transcribed from its C
(ggml-quants.c, dequantize_row_*) as an independent reference for the dequantizer."""

from __future__ import annotations

from itertools import chain

import numpy as np

QK_K = 256


def write_gguf(path, arch, *, meta=None, tensors=None, tokenizer=None):
    """meta: {key without the arch prefix: value} for ints/floats/strings; tensors: {name: (array, qtype)} where
    array is float32 to quantize with gguf.quants, or uint8 raw blocks (rows, bytes) for qtype;
    tokenizer: {gguf key suffix: value} written under `tokenizer.`."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        full = key if key.startswith("general.") else f"{arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_string(full, value)
    for key, value in (tokenizer or {}).items():
        full = f"tokenizer.{key}"
        if isinstance(value, list):
            w.add_array(full, value)
        elif isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        else:
            w.add_string(full, value)
    for name, (array, qtype) in (tensors or {}).items():
        q = gguf.GGMLQuantizationType[qtype]
        if array.dtype == np.uint8:
            w.add_tensor(name, array, raw_dtype=q)
        elif qtype == "F32":
            w.add_tensor(name, array.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _f16(b):
    return float(np.frombuffer(bytes(b), dtype=np.float16)[0])


def random_blocks(qtype, rows, cols, rng):
    """Random raw blocks of a quantization type with small finite fp16 scales (rows, bytes)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(n, 2)).astype(np.float16).view(np.uint8)  # (n, 4) bytes
    if qtype == "Q6_K":
        raw[:, -2:] = scales[:, :2]  # d sits at the end of block_q6_K
    else:
        raw[:, :4] = scales  # d (and dmin / m) lead every other block
    return raw.reshape(rows, -1)


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _block(qtype, b):
    """One block's values, as ggml's dequantize_row_<qtype> computes them."""
    b = [int(x) for x in b]
    if qtype == "Q8_0":
        d = _f16(b[:2])
        return [d * (x - 256 if x > 127 else x) for x in b[2:34]]
    if qtype in ("Q4_0", "Q4_1"):
        d, m, qs = _f16(b[:2]), (_f16(b[2:4]) if qtype == "Q4_1" else None), b[-16:]
        lo, hi = [x & 0xF for x in qs], [x >> 4 for x in qs]
        return [d * q + m if m is not None else d * (q - 8) for q in lo + hi]
    if qtype in ("Q5_0", "Q5_1"):
        d = _f16(b[:2])
        m = _f16(b[2:4]) if qtype == "Q5_1" else None
        off = 4 if m is not None else 2
        qh = int.from_bytes(bytes(b[off : off + 4]), "little")
        qs = b[off + 4 :]
        lo = [(qs[j] & 0xF) | (((qh >> j) & 1) << 4) for j in range(16)]
        hi = [(qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) for j in range(16)]
        return [d * q + m if m is not None else d * (q - 16) for q in lo + hi]
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin, sc = _f16(b[:2]), _f16(b[2:4]), b[4:16]
        qh, ql = (b[16:48], b[48:]) if qtype == "Q5_K" else (None, b[16:])
        y = []
        for j in range(4):  # 64 values per step
            (s1, m1), (s2, m2) = _scale_min_k4(2 * j, sc), _scale_min_k4(2 * j + 1, sc)
            q = ql[32 * j : 32 * j + 32]
            h1 = [((qh[l] >> (2 * j)) & 1) << 4 for l in range(32)] if qh else [0] * 32
            h2 = [((qh[l] >> (2 * j + 1)) & 1) << 4 for l in range(32)] if qh else [0] * 32
            y += [d * s1 * ((x & 0xF) + h) - dmin * m1 for x, h in zip(q, h1)]
            y += [d * s2 * ((x >> 4) + h) - dmin * m2 for x, h in zip(q, h2)]
        return y
    if qtype == "Q6_K":
        ql, qh, sc, d = b[:128], b[128:192], [x - 256 if x > 127 else x for x in b[192:208]], _f16(b[208:210])
        y = [0.0] * QK_K
        for n in range(2):  # 128 values per half
            L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
            for l in range(32):
                i = l // 16
                q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
                q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
                q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
                q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
                base = 128 * n + l
                y[base], y[base + 32] = d * S[i] * q1, d * S[i + 2] * q2
                y[base + 64], y[base + 96] = d * S[i + 4] * q3, d * S[i + 6] * q4
        return y
    raise ValueError(qtype)


def reference_dequantize(qtype, raw):
    """(rows, bytes) raw blocks -> (rows, cols) float64 values by ggml's formulas, one block at a time."""
    import gguf

    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rows = [
        list(chain.from_iterable(_block(qtype, r[i : i + size]) for i in range(0, len(r), size))) for r in raw
    ]
    return np.array(rows, dtype=np.float64)
