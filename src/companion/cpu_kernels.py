"""Decoding kernels in C for x86 CPUs: a few rows times an int4 or an int8 matrix, and one
query per head over a KV cache.

Decoding multiplies every weight matrix by one row (one per sequence of a batch, a few for a
short prompt), so a step is as fast as the matrices can be read. PyTorch's weight-only CPU
kernels (``aten._weight_int4pack_mm_for_cpu``, ``aten._weight_int8pack_mm``) round the row to
bfloat16 and turn every weight into a float before multiplying; on a 2-core CPU that arithmetic, not memory, sets their pace. These
kernels do what llama.cpp does instead: they round the row to integers once per call, multiply
integers by integers with the processor's integer dot-product instructions, and apply the
scales once per group of inputs.

**int4** (:func:`int4_gemv`), weights ``w = q * scale + min`` per group (``q`` in 0 .. 15,
:func:`companion.quantize.quantize_int4`). For each group ``g`` of ``group_size`` inputs:

* the row ``x`` is rounded to int8 with its own step ``d_g = max|x_g| / 127``, as llama.cpp's
  ``Q8_0`` rounds it: ``x ~ d_g * xq``;
* ``sum_i w_i x_i ~ scale * d_g * sum_i q_i xq_i + min * d_g * sum_i xq_i``; both sums are
  exact in int32. The minimum multiplies the sum of the *rounded* row, so the two terms see the
  same ``x`` and the error is ``sum_i w_i e_i`` (about 0.5% of the output, relative; PyTorch's
  kernel, with bfloat16 activations, about 0.3%; int4 itself costs several percent).

The int4 layout (:func:`pack_int4`) is blocks of 16 output rows, each block one contiguous
stretch of memory that a thread reads from start to end. Per group: ``group_size / 8`` chunks
of 64 bytes, then the 16 scales and the 16 minimums as float16. In a chunk, bytes ``4j .. 4j +
3`` hold inputs ``0 .. 3`` of row ``j`` in their low nibbles and inputs ``4 .. 7`` in their
high nibbles, so a 512-bit load and two masks give two registers of 16 rows x 4 inputs, each
one ``vpdpbusd`` (per 32-bit lane, the sum of 4 products of unsigned by signed bytes) against
4 inputs broadcast to every lane. Without VNNI, ``vpmaddubsw`` sums the products in pairs to
int16 and ``vpmaddwd`` widens pairs of those to int32; the AVX2 version adds up to four chunks in
int16 first (at most ``8 x 2 x 15 x 127 = 30480``) and widens once, which halves the
multiplications: a prompt's rows, which the cache serves, went through 10-15% faster on a
2-core Zen 2, and one row, which memory paces, no faster.

**int8** (:func:`int8_gemv`), weights ``w = scale * q`` per row (``q`` int8,
:func:`companion.quantize.quantize_int8`), read in the layer's own ``(out, in)`` layout. The
row is rounded to int16 per group of 256 inputs (``d_g = max|x_g| / 32767``, a relative
1.5e-5 of the group's largest input, 100 times finer than bfloat16; about 3e-5 of the output);
each row's int32 sum per group is exact (``256 * 128 * 32767 < 2**31``); ``y = scale * sum_g
d_g * sum_g``.

Both are the same bit for bit on every CPU that runs them: the integer sums are exact, and
the float operations happen in the same order in the AVX-512 and AVX2 versions
(``tests/test_cpu_kernels.py`` checks it). The attention kernel is written with AVX2's
instructions only, so it too gives the same bits in every version.

The matrix is read from memory once per call: each block of it stays in the cache while
every row of ``x`` goes through it, so a few rows cost little more memory traffic than one.
Each row is rounded on its own and gives the same bits alone or with others.

**Attention of a decoding step** (:func:`attend_one`). A static KV cache is allocated for a
maximum length so that one compiled step serves every request
(:mod:`companion.generation.static_cache`), and the mask hides the slots not yet written.
PyTorch's ``scaled_dot_product_attention`` reads every slot, hidden or not: with the cache
allocated for the model's 2048 positions, a step of the 220M model of ``benchmarks/`` reads
201 MB of keys and values however short the sequence, twice the 105 MB of its int4 weights. This
kernel reads the mask (32 slots per comparison, once per sequence), then the keys and values
of the allowed slots only, once for all the query heads of a key/value head (grouped-query
attention), and computes the softmax over them in float32 (scores, their maximum, ``e^(s -
max)`` by a polynomial, the weighted sum of the values). A step then costs what the written
slots cost, whatever length the cache was allocated for. :func:`companion.layers.sdpa_attention`
sends it every call with one query per head, float32, on a CPU, with no gradient to compute
(:func:`takes_attention`). The keys and values may be the first slots of a longer cache (what
``KVCache.update`` returns for an int ``start_pos``): rows of ``D`` floats one after the other
are read where they lie, not copied.

The kernels are C, compiled on first use with the system's C compiler (the one
``torch.compile`` uses on a CPU) for the vector instructions PyTorch itself dispatches to
(``torch.backends.cpu.get_cpu_capability()``), linked to PyTorch's own OpenMP runtime so that
both share one pool of threads. A small C++ file registers them as PyTorch operators,
``torch.ops.companion.int4_gemv``, ``int8_gemv`` and ``attend_one``, so that a call costs
what a call to PyTorch's own kernels costs (a few microseconds; decoding makes one per matrix
per token) and ``torch.compile`` calls them from its graph. Both builds are cached under
``~/.cache/companion``. Where there is no compiler, no x86 with AVX2, or
``COMPANION_NO_C_KERNELS`` is set, :func:`available` is False, :func:`unavailable_reason`
says why, and :mod:`companion.quantize` and :func:`companion.layers.sdpa_attention` keep
PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from companion.device import cpu_info

__all__ = ["INT8_GROUP", "MAX_ROWS", "ROWS_PER_BLOCK", "attend_one", "attention_enabled", "available", "enabled",
           "int4_gemv", "int4_gemv_reference", "int8_gemv", "int8_gemv_reference", "pack_int4", "takes_attention",
           "unavailable_reason", "variant"]

# Whether companion.quantize's layers call these kernels (where they are available); a switch
# for measuring them against PyTorch's kernels in one process.
enabled = True
# companion.quantize's layers call these kernels for up to this many rows of input (decoding,
# a short prompt); longer prompts keep PyTorch's kernels, against which these were measured
# only up to 256 rows.
MAX_ROWS = 64
# Whether companion.layers.sdpa_attention sends one query per head (a decoding step on a CPU,
# float32) to attend_one, which reads only the cache slots the mask allows.
attention_enabled = True
ROWS_PER_BLOCK = 16  # int4: output rows per block of the layout
INT8_GROUP = 256  # int8: inputs per step of the rounded row

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The largest |x_i| of n floats (n a multiple of 16): exact, whatever the order; NaN if any
   x_i is NaN (max_ps alone would drop it). */
static float absmax(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return NAN;
  float v[8], r = 0.0f;
  _mm256_storeu_ps(v, m);
  for (int j = 0; j < 8; j++) r = v[j] > r ? v[j] : r;
  return r;
}

/* levels / amax, or 0 where that is not a finite number (a group of zeros, of infinities or
   NaNs, or so small that the division overflows): the group's integers are then all 0, and
   its step d = amax / levels carries a NaN or an infinity into the result as it should. */
static float inverse_step(float levels, float amax) {
  const float inv = levels / amax;
  return isfinite(inv) ? inv : 0.0f;
}

/* 4 int8 inputs as one int32 (memcpy: no aliasing of int8 storage through an int32 pointer). */
static inline int32_t four_bytes(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

/* x * inv rounded to the nearest integer, ties to even (the processor's default rounding, as
   lrintf and torch.round), for 8 floats at a time. */
static inline __m256i round8(const float* x, __m256 inv) { return _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv)); }

/* Round x (K floats) to int8 per group of gs inputs (gs a multiple of 16): xq, the step d[g],
   and d[g] * sum(xq). */
static void round_int8(const float* x, int8_t* xq, float* d, float* s, int64_t K, int64_t gs) {
  for (int64_t g = 0; g < K / gs; g++) {
    const float amax = absmax(x + g * gs, gs);
    const __m256 inv = _mm256_set1_ps(inverse_step(127.0f, amax));
    int32_t sum = 0, q[8];
    for (int64_t i = g * gs; i < (g + 1) * gs; i += 8) {
      _mm256_storeu_si256((__m256i*)q, round8(x + i, inv));
      for (int j = 0; j < 8; j++) { xq[i + j] = (int8_t)q[j]; sum += q[j]; }
    }
    d[g] = amax / 127.0f;
    s[g] = d[g] * (float)sum;
  }
}

/* Round x to int16 per group of gs inputs (gs a multiple of 16): xq and the step d[g]. */
static void round_int16(const float* x, int16_t* xq, float* d, int64_t K, int64_t gs) {
  for (int64_t g = 0; g < K / gs; g++) {
    const float amax = absmax(x + g * gs, gs);
    const __m256 inv = _mm256_set1_ps(inverse_step(32767.0f, amax));
    for (int64_t i = g * gs; i < (g + 1) * gs; i += 16) {  /* two rows of 8 int32, packed to 16 int16 in order */
      const __m256i a = round8(x + i, inv), b = round8(x + i + 8, inv);
      _mm256_storeu_si256((__m256i*)(xq + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    d[g] = amax / 32767.0f;
  }
}

/* How far ahead of its reads (bytes) each kernel asks for its weights. On the 2-core Xeon of
   benchmarks/results/, 8 KB read the model's matrices 10% (int4) and 14% (int8) faster than
   1 KB and 2 KB did, and 4 KB to 16 KB were within 2% of each other. */
#ifndef PREFETCH4
#define PREFETCH4 8192
#endif
/* y (M x N) = x (M x K) times the int4 matrix (N x K, layout of companion.cpu_kernels.pack_int4),
   transposed. Each row of x is rounded on its own, and gives the same y whatever M is. */
void int4_gemv(const uint8_t* w, const float* x, float* y, int64_t M, int64_t N, int64_t K, int64_t gs) {
  const int64_t G = K / gs, chunks = gs / 8, group_bytes = gs * 8 + 64, block_bytes = G * group_bytes;
  int8_t* xq_all = aligned_alloc(64, (M * K + 63) / 64 * 64);
  float* dx_all = malloc(2 * M * G * sizeof(float));
  for (int64_t t = 0; t < M; t++)
    round_int8(x + t * K, xq_all + t * K, dx_all + 2 * t * G, dx_all + (2 * t + 1) * G, K, gs);
  #pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < N / 16; b++)  /* one block of 16 rows, read from memory once */
  for (int64_t t = 0; t < M; t++) {     /* and from the cache for every row of x after the first */
    const uint8_t* p = w + b * block_bytes;
    const int8_t* xq = xq_all + t * K;
    const float* dx = dx_all + 2 * t * G;
    const float* xs = dx + G;
    float* yt = y + t * N;
#ifdef __AVX512BW__
    const __m512i low4 = _mm512_set1_epi8(15);
#ifndef __AVX512VNNI__
    const __m512i ones = _mm512_set1_epi16(1);
#endif
    __m512 yv = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++, p += group_bytes) {
      const int8_t* xp = xq + g * gs;
      __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
      for (int64_t c = 0; c < chunks; c++) {
        _mm_prefetch((const char*)(p + c * 64 + PREFETCH4), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p + c * 64);
        const __m512i lo = _mm512_and_si512(v, low4);                          /* inputs 8c + 0..3 */
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);    /* inputs 8c + 4..7 */
        const __m512i xa = _mm512_set1_epi32(four_bytes(xp + 8 * c)), xb = _mm512_set1_epi32(four_bytes(xp + 8 * c + 4));
#ifdef __AVX512VNNI__
        a0 = _mm512_dpbusd_epi32(a0, lo, xa);
        a1 = _mm512_dpbusd_epi32(a1, hi, xb);
#else  /* pairs summed to int16 (at most 2 * 15 * 127), then pairs of those to int32 */
        a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(_mm512_maddubs_epi16(lo, xa), ones));
        a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(_mm512_maddubs_epi16(hi, xb), ones));
#endif
      }
      const uint8_t* sm = p + chunks * 64;  /* 16 scales, then 16 minimums, float16 */
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sm));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sm + 32)));
      yv = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[g]), yv);
      yv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)), _mm512_mul_ps(s, _mm512_set1_ps(dx[g])), yv);
    }
    _mm512_storeu_ps(yt + b * 16, yv);
#else  /* AVX2: the same operations on rows 0-7 and 8-15 of the block, in the same order */
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++, p += group_bytes) {
      const int8_t* xp = xq + g * gs;
      __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();  /* rows 0-7, rows 8-15 */
      for (int64_t c0 = 0; c0 < chunks; c0 += 4) {  /* up to 4 chunks summed in int16: at most 8 * 2 * 15 * 127 */
        __m256i h0 = _mm256_setzero_si256(), h1 = _mm256_setzero_si256();
        for (int64_t c = c0; c < c0 + 4 && c < chunks; c++) {
          _mm_prefetch((const char*)(p + c * 64 + PREFETCH4), _MM_HINT_T0);
          const __m256i v0 = _mm256_loadu_si256((const __m256i*)(p + c * 64));
          const __m256i v1 = _mm256_loadu_si256((const __m256i*)(p + c * 64 + 32));
          const __m256i xa = _mm256_set1_epi32(four_bytes(xp + 8 * c)), xb = _mm256_set1_epi32(four_bytes(xp + 8 * c + 4));
#define DOT(acc, bytes, xv) acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(bytes, xv))
          DOT(h0, _mm256_and_si256(v0, low4), xa);
          DOT(h0, _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), xb);
          DOT(h1, _mm256_and_si256(v1, low4), xa);
          DOT(h1, _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), xb);
#undef DOT
        }
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(h0, ones));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(h1, ones));
      }
      const uint8_t* sm = p + chunks * 64;
      const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)sm));
      const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sm + 16)));
      const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sm + 32)));
      const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sm + 48)));
      const __m256 d = _mm256_set1_ps(dx[g]), t = _mm256_set1_ps(xs[g]);
      y0 = _mm256_fmadd_ps(m0, t, y0);
      y0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(s0, d), y0);
      y1 = _mm256_fmadd_ps(m1, t, y1);
      y1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(s1, d), y1);
    }
    _mm256_storeu_ps(yt + b * 16, y0);
    _mm256_storeu_ps(yt + b * 16 + 8, y1);
#endif
  }
  free(xq_all);
  free(dx_all);
}

#ifndef PREFETCH8
#define PREFETCH8 8192
#endif
/* The exact int32 sum of one row's int8 weights times the int16 inputs of one group of 256. */
static inline int32_t dot256(const int8_t* w, const int16_t* x) {
#ifdef __AVX512BW__
  __m512i a = _mm512_setzero_si512();
  for (int c = 0; c < 256; c += 32) {
    if (c % 64 == 0) _mm_prefetch((const char*)(w + c + PREFETCH8), _MM_HINT_T0);
    const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + c)));
    const __m512i xv = _mm512_loadu_si512(x + c);
#ifdef __AVX512VNNI__
    a = _mm512_dpwssd_epi32(a, wv, xv);
#else
    a = _mm512_add_epi32(a, _mm512_madd_epi16(wv, xv));
#endif
  }
  return _mm512_reduce_add_epi32(a);
#else
  __m256i a = _mm256_setzero_si256();
  for (int c = 0; c < 256; c += 16) {
    if (c % 64 == 0) _mm_prefetch((const char*)(w + c + PREFETCH8), _MM_HINT_T0);
    const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + c)));
    a = _mm256_add_epi32(a, _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i*)(x + c))));
  }
  const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const __m128i q = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1)));
#endif
}

/* y (M x N) = scales (N) * (x (M x K) times the int8 matrix (N x K, row-major), transposed);
   K a multiple of 256. Each row of x is rounded on its own, and gives the same y whatever M is. */
void int8_gemv(const int8_t* w, const float* scales, const float* x, float* y, int64_t M, int64_t N, int64_t K) {
  const int64_t G = K / 256;
  int16_t* xq = aligned_alloc(64, M * K * sizeof(int16_t));
  float* dx = malloc(M * G * sizeof(float));
  for (int64_t t = 0; t < M; t++) round_int16(x + t * K, xq + t * K, dx + t * G, K, 256);
  /* One row of w at a time, so that each thread reads one contiguous stretch of memory from start
     to end (as the int4 layout makes it do); on a 2-core AMD EPYC (Zen 2) this read the model's
     matrices 28% faster than four rows taken in turns, which shared their loads of x. */
  #pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < N; r++)
  for (int64_t t = 0; t < M; t++) {  /* the row stays in the cache for every row of x after the first */
    float acc = 0.0f;
    for (int64_t g = 0; g < G; g++)
      acc = fmaf(dx[t * G + g], (float)dot256(w + r * K + g * 256, xq + t * K + g * 256), acc);
    y[t * N + r] = acc * scales[r];
  }
  free(xq);
  free(dx);
}
/* e^x for 8 floats x <= 0 (the scores less their maximum), Cephes' expf: x = n ln 2 + r with
   |r| <= ln(2) / 2, e^r by a polynomial of degree 7, times 2^n. Within 2 ulp of e^x down to
   e^-87 (smaller x give 2^-126 or so, which a sum that holds e^0 = 1 never sees); a NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  /* max_ps returns its second operand when it is NaN */
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* The sum of 8 floats, in a fixed order. */
static inline float sum8(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

/* The indices of the nonzero bytes of allowed[0 .. S-1], in order, into slot; their number.
   32 bytes at a time: one compare gives a bit per byte, and each set bit is one slot. */
static int64_t allowed_slots(const uint8_t* allowed, int64_t S, int32_t* slot) {
  int64_t n = 0, s = 0;
  for (; s + 32 <= S; s += 32) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i*)(allowed + s));
    uint32_t bits = ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, _mm256_setzero_si256()));
    for (; bits; bits &= bits - 1) slot[n++] = (int32_t)(s + __builtin_ctz(bits));
  }
  for (; s < S; s++) if (allowed[s]) slot[n++] = (int32_t)s;
  return n;
}

/* One query per head against a KV cache: out (B, H, D) = softmax(q k^T / sqrt(D)) v over the
   slots s the mask allows (mask[b * mask_stride + s] nonzero), for q (B, H, D) and k, v
   (B, KV, S, D) with H a multiple of KV (query head h reads key/value head h / (H / KV)) and D a
   multiple of 8. The S rows of D floats of (b, kv) start at k + b * k_b + kv * k_h (v likewise),
   so the first S slots of a longer cache are read in place. The keys and values of slots the
   mask hides are never read: a cache allocated for a maximum length costs what its written
   slots cost. A query with no allowed slot gets zeros, as PyTorch 2.13's
   scaled_dot_product_attention gives. The same AVX2 operations in the same order in every
   variant, so the same bits on every CPU that runs them. */
void attend_one(const float* q, const float* k, const float* v, const uint8_t* mask, float* out,
                int64_t B, int64_t H, int64_t KV, int64_t S, int64_t D, int64_t mask_stride,
                int64_t k_b, int64_t k_h, int64_t v_b, int64_t v_h) {
  const int64_t G = H / KV, rows = mask_stride ? B : 1;  /* a mask row per sequence, or one for all */
  const __m256 scale = _mm256_set1_ps(1.0f / sqrtf((float)D));
  int32_t* slots = malloc(rows * S * sizeof(int32_t));  /* each row's allowed slots, found once */
  int64_t* counts = malloc(rows * sizeof(int64_t));
  for (int64_t r = 0; r < rows; r++) counts[r] = allowed_slots(mask + r * mask_stride, S, slots + r * S);
  #pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < B * KV; task++) {  /* one key/value head and its G query heads */
    const int64_t b = task / KV, kv = task % KV, h0 = kv * G, r = mask_stride ? b : 0;
    const int32_t* slot = slots + r * S;
    const int64_t n = counts[r];
    const float* kb = k + b * k_b + kv * k_h;
    const float* vb = v + b * v_b + kv * v_h;
    const float* qb = q + (b * H + h0) * D;
    float* ob = out + (b * H + h0) * D;
    if (n == 0) { memset(ob, 0, G * D * sizeof(float)); continue; }
    const int64_t n8 = (n + 7) / 8 * 8;
    float* w = aligned_alloc(32, G * n8 * sizeof(float));  /* scores, then weights, (G, n8) */
    for (int64_t i = 0; i < n; i++) {  /* scores: each key row is read once for the G queries */
      const float* kr = kb + slot[i] * D;
      for (int64_t g = 0; g < G; g++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qb + g * D + d), _mm256_loadu_ps(kr + d), a);
        w[g * n8 + i] = sum8(_mm256_mul_ps(a, scale));
      }
    }
    for (int64_t g = 0; g < G; g++) {  /* weights e^(score - max), zero past n; their sum */
      float* wg = w + g * n8;
      float m = wg[0];
      for (int64_t i = 1; i < n; i++) m = (wg[i] > m || wg[i] != wg[i]) ? wg[i] : m;  /* NaN wins */
      for (int64_t i = n; i < n8; i++) wg[i] = m;
      const __m256 mv = _mm256_set1_ps(m);
      __m256 l = _mm256_setzero_ps();
      for (int64_t i = 0; i < n8; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(wg + i), mv));
        _mm256_store_ps(wg + i, e);
        if (i + 8 > n) for (int64_t j = n; j < n8; j++) wg[j] = 0.0f;
        l = _mm256_add_ps(l, _mm256_load_ps(wg + i));
      }
      const float inv = 1.0f / sum8(l);
      for (int64_t d = 0; d < D; d++) ob[g * D + d] = 0.0f;
      for (int64_t i = 0; i < n; i++) {  /* v rows in the order of the slots, from the cache after the first query */
        const __m256 p = _mm256_set1_ps(wg[i] * inv);
        const float* vr = vb + slot[i] * D;
        for (int64_t d = 0; d < D; d += 8)
          _mm256_storeu_ps(ob + g * D + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(ob + g * D + d)));
      }
    }
    free(w);
  }
  free(slots);
  free(counts);
}
"""

# The C++ side: the two operators, which check their arguments and call the C kernels.
OPERATORS = r"""
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <vector>

typedef void (*int4_fn)(const uint8_t*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
typedef void (*int8_fn)(const int8_t*, const float*, const float*, float*, int64_t, int64_t, int64_t);
typedef void (*attend_fn)(const float*, const float*, const float*, const uint8_t*, float*, int64_t, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
static int4_fn int4_kernel = nullptr;
static int8_fn int8_kernel = nullptr;
static attend_fn attend_kernel = nullptr;

extern "C" void companion_set_kernels(void* int4, void* int8, void* attend) {
  int4_kernel = reinterpret_cast<int4_fn>(int4);
  int8_kernel = reinterpret_cast<int8_fn>(int8);
  attend_kernel = reinterpret_cast<attend_fn>(attend);
}

static at::Tensor int4_gemv(const at::Tensor& packed, const at::Tensor& x, int64_t out_features, int64_t group_size) {
  TORCH_CHECK(int4_kernel != nullptr, "companion::int4_gemv: the C kernel is not loaded");
  TORCH_CHECK(group_size > 0 && group_size % 16 == 0, "group_size=", group_size, " must be a positive multiple of 16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
              packed.size(0) * 16 == out_features && packed.size(2) == group_size * 8 + 64,
              "packed must be contiguous uint8 (out_features / 16, in_features / group_size, group_size * 8 + 64) "
              "for out_features=", out_features, ", group_size=", group_size, "; got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.is_floating_point() && x.dim() >= 1, "x must be floating point on the CPU");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t K = packed.size(1) * group_size;
  TORCH_CHECK(K > 0 && xf.size(-1) == K, "x has ", xf.size(-1), " inputs per row; the matrix has ", K);
  const int64_t M = xf.numel() / K;
  std::vector<int64_t> shape(xf.sizes().begin(), xf.sizes().end());
  shape.back() = out_features;
  at::Tensor y = at::empty(shape, xf.options());
  int4_kernel(packed.data_ptr<uint8_t>(), xf.data_ptr<float>(), y.data_ptr<float>(), M, out_features, K, group_size);
  return y;
}

static at::Tensor int8_gemv(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& x) {
  TORCH_CHECK(int8_kernel != nullptr, "companion::int8_gemv: the C kernel is not loaded");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 && qweight.is_contiguous() &&
              qweight.size(1) % 256 == 0, "qweight must be contiguous int8 (out, in) with in a multiple of 256; got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const at::Tensor s = scales.to(at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == qweight.size(0), "scales has ", s.numel(), " elements for ", qweight.size(0), " rows");
  TORCH_CHECK(x.device().is_cpu() && x.is_floating_point() && x.dim() >= 1, "x must be floating point on the CPU");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(K > 0 && xf.size(-1) == K, "x has ", xf.size(-1), " inputs per row; the matrix has ", K);
  const int64_t M = xf.numel() / K;
  std::vector<int64_t> shape(xf.sizes().begin(), xf.sizes().end());
  shape.back() = N;
  at::Tensor y = at::empty(shape, xf.options());
  int8_kernel(qweight.data_ptr<int8_t>(), s.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), M, N, K);
  return y;
}

static at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(attend_kernel != nullptr, "companion::attend_one: the C kernel is not loaded");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "q must be (B, H, 1, D): one query per head; got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k and v must be (B, KV, S, D) alike; got ", k.sizes(), " and ",
              v.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k ", k.sizes(), " does not match q ", q.sizes());
  TORCH_CHECK(KV > 0 && H % KV == 0, "H=", H, " query heads must be a multiple of KV=", KV, " key/value heads");
  TORCH_CHECK(D > 0 && D % 8 == 0, "head dimension D=", D, " must be a positive multiple of 8");
  TORCH_CHECK(S < (int64_t(1) << 31), "S=", S, " slots: at most 2**31 - 1");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "q, k and v must be float32 on the CPU; got ",
                t->scalar_type(), " on ", t->device());
  const bool mask_shape = mask.dim() >= 1 && mask.dim() <= 3 && mask.size(-1) == S &&
                          (mask.dim() == 1 || mask.size(-2) == 1) &&
                          (mask.dim() < 3 || mask.size(0) == 1 || mask.size(0) == B);
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask_shape,
              "mask must be bool (S,), (1, S), or (1 or B, 1, S): one row for every sequence of the batch (B=", B,
              ") or one for all, with S=", S, " entries; got ", mask.scalar_type(), " ", mask.sizes());
  /* rows of D floats one after the other: a slice of the first slots of a cache is read where it is */
  const auto rows = [D](const at::Tensor& t) { return t.stride(3) == 1 && t.stride(2) == D ? t : t.contiguous(); };
  const at::Tensor qc = q.contiguous(), kc = rows(k), vc = rows(v), mc = mask.contiguous();
  at::Tensor out = at::empty(qc.sizes(), qc.options());
  attend_kernel(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(),
                reinterpret_cast<const uint8_t*>(mc.data_ptr<bool>()), out.data_ptr<float>(), B, H, KV, S, D,
                mask.numel() == S ? 0 : S, kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1));
  return out;
}

TORCH_LIBRARY(companion, m) {
  m.def("int4_gemv(Tensor packed, Tensor x, int out_features, int group_size) -> Tensor");
  m.def("int8_gemv(Tensor qweight, Tensor scales, Tensor x) -> Tensor");
  m.def("attend_one(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.impl("int4_gemv", c10::DispatchKey::CPU, TORCH_FN(int4_gemv));
  m.impl("int8_gemv", c10::DispatchKey::CPU, TORCH_FN(int8_gemv));
  m.impl("attend_one", c10::DispatchKey::CPU, TORCH_FN(attend_one));
}
"""

# Compiler flags per variant: what the code needs, nothing the CPU may lack.
FLAGS = {
    "avx512_vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-mfma"],
    "avx2": ["-mavx2", "-mf16c", "-mfma"],
}


def _cpu_flags() -> set[str]:
    return set(cpu_info("flags").split())


def variant() -> str | None:
    """The version this CPU runs: ``"avx512_vnni"``, ``"avx512"``, ``"avx2"``, or None.

    It follows PyTorch's own choice (``ATEN_CPU_CAPABILITY`` lowers it), so the kernels never
    use an instruction PyTorch was told to avoid.
    """
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512_vnni" if "avx512_vnni" in _cpu_flags() else "avx512"
    if capability == "AVX2":
        return "avx2"
    return None


def variants_here() -> list[str]:
    """Every variant this CPU can run (for tests: they must agree bit for bit)."""
    if variant() is None:
        return []
    flags, names = _cpu_flags(), ["avx2"]
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        names.append("avx512")
        if "avx512_vnni" in flags:
            names.append("avx512_vnni")
    return names


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def _openmp_link_flags() -> list[str]:
    """Link to the OpenMP runtime PyTorch loaded (its wheel's own copy when it has one)."""
    bundled = sorted(glob.glob(str(_torch_lib() / "libgomp*.so*")))
    if bundled:
        return [f"-L{_torch_lib()}", f"-l:{Path(bundled[0]).name}", f"-Wl,-rpath,{_torch_lib()}"]
    return ["-lgomp"]


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "companion" / "kernels"
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "companion-kernels"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _build(name: str, source: str, suffix: str, command: list[str], link: list[str]) -> Path:
    """Compile ``source`` with ``command`` into the cache unless it is there; the library's path."""
    key = hashlib.sha256("\n".join([source, *command, *link, torch.__version__]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{name}_{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        path = Path(tmp) / f"{name}.{suffix}"
        path.write_text(source)
        built = Path(tmp) / target.name
        result = subprocess.run([*command, str(path), "-o", str(built), *link], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: parallel processes never load a half-written file
    return target


def compile_kernels(name: str) -> Path:
    """Compile the C kernels for variant ``name`` (a key of :data:`FLAGS`) unless cached; the path.

    Raises RuntimeError, with the compiler's message, when they cannot be built.
    """
    if name not in FLAGS:
        raise ValueError(f"variant={name!r} must be one of {sorted(FLAGS)}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    command = [compiler, "-O3", "-fPIC", "-shared", "-fopenmp", "-fno-fast-math", "-ffp-contract=off", *FLAGS[name]]
    return _build(f"kernels_{name}", SOURCE, "c", command, _openmp_link_flags())


def compile_operators() -> Path:
    """Compile the C++ file that registers the operators against this PyTorch; the path."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    include = _torch_lib().parent / "include"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [compiler, "-O2", "-std=c++20", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
               f"-I{include}"]
    link = [f"-L{_torch_lib()}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{_torch_lib()}"]
    return _build("operators", OPERATORS, "cpp", command, link)


@functools.lru_cache(maxsize=None)
def _kernels(name: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(compile_kernels(name)))
    lib.int4_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    lib.int4_gemv.restype = None
    lib.int8_gemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.int8_gemv.restype = None
    lib.attend_one.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 10
    lib.attend_one.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str | None]:
    """Build and register everything once: (whether the operators run, why not)."""
    if os.environ.get("COMPANION_NO_C_KERNELS"):
        return False, "COMPANION_NO_C_KERNELS is set"
    name = variant()
    if name is None:
        return False, (f"no AVX2 or AVX-512 on this CPU as PyTorch sees it ({platform.system()} "
                       f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()})")
    try:
        kernels = _kernels(name)
        operators_path = compile_operators()
        torch.ops.load_library(str(operators_path))
    except (RuntimeError, OSError) as error:
        return False, str(error)
    operators = ctypes.CDLL(str(operators_path))  # the same library, already loaded: to hand it the kernels
    operators.companion_set_kernels(ctypes.cast(kernels.int4_gemv, ctypes.c_void_p),
                                    ctypes.cast(kernels.int8_gemv, ctypes.c_void_p),
                                    ctypes.cast(kernels.attend_one, ctypes.c_void_p))

    @torch.library.register_fake("companion::int4_gemv")
    def _int4_fake(packed: Tensor, x: Tensor, out_features: int, group_size: int) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32)

    @torch.library.register_fake("companion::int8_gemv")
    def _int8_fake(qweight: Tensor, scales: Tensor, x: Tensor) -> Tensor:
        return x.new_empty(*x.shape[:-1], qweight.size(0), dtype=torch.float32)

    @torch.library.register_fake("companion::attend_one")
    def _attend_fake(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    return True, None


@torch.compiler.assume_constant_result  # torch.compile reads it once, at tracing, without tracing into the build
def available() -> bool:
    """Whether the kernels are built and registered here (the first call builds them)."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    return _load()[1]


def fits_float16(values: Tensor) -> bool:
    """Whether float16 keeps ``values`` to 11 significant bits: no overflow, no subnormals."""
    v = values.float()
    half = v.half().float()
    return bool(torch.isfinite(half).all() and ((half - v).abs() <= v.abs() * 2.0 ** -11).all())


def pack_int4(q: Tensor, scales: Tensor, mins: Tensor, group_size: int) -> Tensor:
    """The int4 kernel's layout: uint8 ``(out / 16, in / group_size, group_size * 8 + 64)``.

    ``q``: ``(out, in)`` integers 0 .. 15, one per byte (:func:`companion.quantize.unpack_int4`);
    ``scales``, ``mins``: ``(out, in / group_size)``, stored as float16.
    """
    if q.dim() != 2:
        raise ValueError(f"q must be (out, in), got shape {tuple(q.shape)}")
    N, K = q.shape
    if N % ROWS_PER_BLOCK:
        raise ValueError(f"out_features={N} must be a multiple of {ROWS_PER_BLOCK}")
    if group_size <= 0 or group_size % 16 or K % group_size:
        raise ValueError(f"group_size={group_size} must be a multiple of 16 that divides in_features={K}")
    G, C = K // group_size, group_size // 8
    if scales.shape != (N, G) or mins.shape != (N, G):
        raise ValueError(f"scales and mins must be {(N, G)}, got {tuple(scales.shape)} and {tuple(mins.shape)}")
    if int(q.min()) < 0 or int(q.max()) > 15:
        raise ValueError(f"q must hold integers 0 .. 15, got {int(q.min())} .. {int(q.max())}")
    for label, t in (("scales", scales), ("mins", mins)):
        if not fits_float16(t):
            nonzero = t[t != 0].abs()
            raise ValueError(f"{label} do not fit float16 without losing precision (max |value| "
                             f"{t.abs().max().item():.3g}, min nonzero |value| "
                             f"{nonzero.min().item() if nonzero.numel() else 0:.3g})")
    # (blocks, G, chunks, 16 rows, 8 inputs): byte 4j + u of a chunk holds input u of row j in
    # its low nibble and input 4 + u in its high nibble.
    o = q.to(torch.uint8).reshape(N // 16, 16, G, C, 8).permute(0, 2, 3, 1, 4)
    chunks = (o[..., :4] | (o[..., 4:] << 4)).reshape(N // 16, G, C * 64)

    def per_block(t: Tensor) -> Tensor:  # (N, G) -> (blocks, G, 32 bytes) of float16
        return t.half().reshape(N // 16, 16, G).transpose(1, 2).contiguous().view(torch.uint8)

    return torch.cat([chunks, per_block(scales), per_block(mins)], dim=-1).contiguous()


def _inverse_step(levels: float, amax: Tensor) -> Tensor:
    """``levels / amax``, 0 where that is not finite (zeros, NaN, overflow): the C kernels' ``inverse_step``."""
    inv = levels / amax
    return torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))


def int4_gemv_reference(q: Tensor, scales: Tensor, mins: Tensor, x: Tensor, group_size: int) -> Tensor:
    """What :func:`int4_gemv` computes, in PyTorch: the same integers, the sums in another order.

    ``q`` ``(out, in)`` integers 0 .. 15; ``scales``, ``mins`` ``(out, in / group_size)``, used
    as float16 like the kernel; ``x`` ``(in,)``. Returns ``(out,)`` float32.
    """
    N, K = q.shape
    xg = x.float().reshape(K // group_size, group_size)  # (G, g)
    amax = xg.abs().amax(-1)  # (G,)
    inv = _inverse_step(127.0, amax)
    xq = torch.round(xg * inv[:, None]).to(torch.int32)  # (G, g): -127 .. 127, ties to even as lrintf
    step = amax / 127.0  # d_g
    dots = (q.to(torch.int32).view(N, -1, group_size) * xq).sum(-1)  # (out, G): exact
    scale, low = scales.half().float(), mins.half().float()
    return (scale * step * dots.float() + low * (step * xq.sum(-1).float())).sum(-1)


def int8_gemv_reference(qweight: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    """What :func:`int8_gemv` computes, in PyTorch: ``x`` rounded to int16 per 256, exact integer sums."""
    N, K = qweight.shape
    xg = x.float().reshape(K // INT8_GROUP, INT8_GROUP)
    amax = xg.abs().amax(-1)
    inv = _inverse_step(32767.0, amax)
    xq = torch.round(xg * inv[:, None]).to(torch.int64)  # (G, 256)
    dots = (qweight.to(torch.int64).view(N, -1, INT8_GROUP) * xq).sum(-1)  # (out, G): exact
    return scales.float() * ((amax / 32767.0) * dots.float()).sum(-1)


def _require() -> None:
    ok, reason = _load()
    if not ok:
        raise RuntimeError(f"the C kernels are not available: {reason}")


def int4_gemv(packed: Tensor, x: Tensor, out_features: int, group_size: int) -> Tensor:
    """``(..., out_features)`` float32: rows ``x`` ``(..., in_features)``, any float dtype, times the
    int4 matrix :func:`pack_int4` packed (transposed, as ``F.linear``).

    ``torch.ops.companion.int4_gemv``, so ``torch.compile`` calls it from its graph. Each row is
    rounded on its own and gives the same result alone or with others. The matrix is read from
    memory once per call, whatever the number of rows: a few rows (a short prompt) cost little
    more than one.
    """
    _require()
    return torch.ops.companion.int4_gemv(packed, x, out_features, group_size)


def int8_gemv(qweight: Tensor, scales: Tensor, x: Tensor) -> Tensor:
    """``(..., out)`` float32: rows ``x`` ``(..., in)`` times ``scales[:, None] * qweight``, transposed.

    ``qweight`` is int8 ``(out, in)`` with ``in`` a multiple of 256, ``scales`` ``(out,)``:
    :class:`companion.quantize.Int8Linear`'s own buffers. ``torch.ops.companion.int8_gemv``.
    """
    _require()
    return torch.ops.companion.int8_gemv(qweight, scales, x)


def attend_one(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``(B, H, 1, D)``: one query per head ``q`` ``(B, H, 1, D)`` attending over a KV cache ``k``,
    ``v`` ``(B, KV, S, D)`` (``H`` a multiple of ``KV``: grouped heads are read, not copied),
    where the bool ``mask`` ``(..., S)`` (one row, or one per sequence) allows; float32.

    What :func:`companion.layers.sdpa_attention` computes, scale ``1 / sqrt(D)``; the keys and
    values of the slots the mask hides are never read, so a cache allocated for a maximum length
    costs only its written slots. A query with no allowed slot gets zeros, as PyTorch 2.13's
    kernel gives. ``torch.ops.companion.attend_one``; it has no backward pass, so gradients do
    not flow through it (:func:`takes_attention` sends it no call that needs them).
    """
    _require()
    return torch.ops.companion.attend_one(q, k, v, mask)


def takes_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> bool:
    """Whether :func:`companion.layers.sdpa_attention` hands this call to :func:`attend_one`.

    The switch :data:`attention_enabled` is on; one query per head (a decoding step); ``q``,
    ``k`` and ``v`` float32 on a CPU, and a bool mask; a head dimension that is a multiple of
    8; no gradient to compute (the kernel has no backward pass); and the kernels run here
    (:func:`available`, which builds them on its first call). Anything else keeps PyTorch's
    kernel.
    """
    tensors = (q, k, v)
    return (attention_enabled and q.size(2) == 1 and mask.dtype == torch.bool and q.size(-1) % 8 == 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and available())


def run_variant(name: str, kernel: str, *args: Tensor | int) -> Tensor:
    """``int4_gemv``, ``int8_gemv`` or ``attend_one`` (``kernel``: ``"int4"``, ``"int8"``,
    ``"attend"``) with a chosen variant, through ctypes.

    For tests: every variant must give the same bits. The arguments are those of the
    functions above, already checked by them.
    """
    lib = _kernels(name)
    if kernel == "int4":
        packed, x, out_features, group_size = args
        x = x.float().contiguous()
        y = x.new_empty(*x.shape[:-1], out_features)
        lib.int4_gemv(packed.data_ptr(), x.data_ptr(), y.data_ptr(), x.numel() // x.size(-1), out_features,
                      x.size(-1), group_size)
    elif kernel == "int8":
        qweight, scales, x = args
        x, scales = x.float().contiguous(), scales.float().contiguous()
        y = x.new_empty(*x.shape[:-1], qweight.size(0))
        lib.int8_gemv(qweight.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), x.numel() // x.size(-1),
                      *qweight.shape)
    elif kernel == "attend":
        q, k, v, mask = (t.contiguous() for t in args)
        (B, H, _, D), (_, KV, S, _) = q.shape, k.shape
        y = torch.empty_like(q)
        lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), y.data_ptr(), B, H, KV, S, D,
                       0 if mask.numel() == S else S, *k.stride()[:2], *v.stride()[:2])
    else:
        raise ValueError(f"kernel={kernel!r} must be 'int4', 'int8' or 'attend'")
    return y
