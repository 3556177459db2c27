/* Decode attention over a quantized paged KV cache (int8 or fp8 e4m3 codes with a
 * float16 scale per token and KV head), for CPUs: the counterpart of
 * paged_decode_window_f32, built on its vector helpers.
 *
 * A cached row (one token, one KV head) is `dim` one-byte codes followed by the
 * little-endian float16 scale they are multiplied by (see kernels/kv_quant.py). Codes
 * become floats in registers, 16 at a time, inside the dot products: per 16-token tile
 * and KV head, keys are converted once into a small tile (L1) that the group's query
 * heads share; the key scale multiplies each score and the value scale each value row.
 * Nothing of the context is copied out at full precision, and the loop reads a quarter
 * of the bytes the float32 kernel reads.
 *
 * Layouts:
 *   q, out        [num_seqs, heads, dim] float32
 *   k/v caches    [num_blocks, block_size, kv_heads, dim + 2] bytes
 *   block_tables  [num_seqs, table_stride] int32
 *   seq_lens      [num_seqs] int32, keys visible to each sequence's query
 *
 * Its entry point, ``paged_decode_quant_window``, takes a sliding window and a score cap
 * with the meaning they have in ``paged_decode_window_f32``: blocks wholly before the window are never
 * read, so a hybrid KV cache may already have given them back to the pool.
 */

#include "paged_decode.c"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef int8_t s8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

#define SCALE_BYTES 2

struct qdecode_args {
    const uint8_t *k_cache, *v_cache;
    const int32_t *block_tables, *seq_lens;
    long row; /* bytes per cached token: kv_heads * (dim + SCALE_BYTES) */
    int heads, kv_heads, dim, block_size, table_stride;
    float scale;
    int window;    /* keys visible to the query, its own included; 0: all */
    float softcap; /* 0: scores uncapped */
};

/* The first key position the query of a ``length``-token sequence sees. */
static inline int q_window_start(const struct qdecode_args *a, int length)
{
    return a->window > 0 && length > a->window ? length - a->window : 0;
}

static inline float scale_at(const uint8_t *p)
{
    _Float16 h;
    memcpy(&h, p, sizeof h);
    return (float)h;
}

/* 16 bytes widened to int32 lanes, sign- or zero-extended. gcc scalarizes a generic
 * vector conversion from bytes, so the x86 widening instructions are used where the
 * build has them. */
static inline __attribute__((always_inline)) i16 widen16(const uint8_t *p, const int is_signed)
{
#if defined(__AVX512F__)
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return (i16)(is_signed ? _mm512_cvtepi8_epi32(raw) : _mm512_cvtepu8_epi32(raw));
#elif defined(__AVX2__)
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    const __m128i high = _mm_unpackhi_epi64(raw, raw);
    const __m256i lo = is_signed ? _mm256_cvtepi8_epi32(raw) : _mm256_cvtepu8_epi32(raw);
    const __m256i hi = is_signed ? _mm256_cvtepi8_epi32(high) : _mm256_cvtepu8_epi32(high);
    i16 out;
    memcpy(&out, &lo, sizeof lo);
    memcpy((char *)&out + sizeof lo, &hi, sizeof hi);
    return out;
#else
    if (is_signed) {
        s8x16 c;
        memcpy(&c, p, sizeof c);
        return __builtin_convertvector(c, i16);
    }
    u8x16 c;
    memcpy(&c, p, sizeof c);
    return __builtin_convertvector(c, i16);
#endif
}

static inline __attribute__((always_inline)) v16 int8x16(const uint8_t *p)
{
    return __builtin_convertvector(widen16(p, 1), v16);
}

/* 16 e4m3 codes as floats by integer arithmetic (no table gather, no denormal float
 * math): normal (e > 0) is (8 + m) * 2^(e - 10), subnormal m * 2^-9; the sign bit moves
 * to bit 31. The NaN codes (0x7f, 0xff) never occur: writes clamp to +-448. */
static inline __attribute__((always_inline)) v16 fp8x16(const uint8_t *p)
{
    const i16 b = widen16(p, 0);
    const i16 e = (b >> 3) & 15, normal = e > 0;
    const i16 mant = (b & 7) | (normal & 8);
    const i16 power = ((e | (~normal & 1)) + 117) << 23; /* 2^(max(e, 1) - 10) */
    const v16 mag = __builtin_convertvector(mant, v16) * (v16)power;
    return (v16)((i16)mag | ((b & 0x80) << 24));
}

/* 16 float16 scales (bits in the low half of each lane) as floats, by integer
 * arithmetic like fp8x16: a float16 conversion call per row would spill every vector
 * register where the compiler has no native instruction for it. Scales are positive
 * and finite; subnormal ones are m * 2^-24. */
static inline __attribute__((always_inline)) v16 half16(i16 b)
{
    const i16 e = (b >> 10) & 31, normal = e > 0;
    const i16 mant = (b & 1023) | (normal & 1024);
    const i16 power = ((e | (~normal & 1)) + 102) << 23; /* 2^(max(e, 1) - 25) */
    return __builtin_convertvector(mant, v16) * (v16)power;
}

static inline __attribute__((always_inline)) v16 codes16(const uint8_t *p, const int fp8)
{
    return fp8 ? fp8x16(p) : int8x16(p);
}

/* The sum of the lanes, by shuffles (a scalar loop would be one long latency chain). */
static inline __attribute__((always_inline)) float sum16(v16 v)
{
    v += __builtin_shuffle(v, (i16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (i16){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (i16){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (i16){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

/* acc[c] += sum over t < count of p[t] * tile[t][c], in four independent sums per
 * chunk so the additions do not wait on one another. */
static inline __attribute__((always_inline)) void weighted_rows(v16 *acc, const float *p,
                                                                 const v16 *tile, int count,
                                                                 const int chunks)
{
    for (int c = 0; c < chunks; c++) {
        v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        int t = 0;
        for (; t + 3 < count; t += 4) {
            s0 += p[t] * tile[t * chunks + c];
            s1 += p[t + 1] * tile[(t + 1) * chunks + c];
            s2 += p[t + 2] * tile[(t + 2) * chunks + c];
            s3 += p[t + 3] * tile[(t + 3) * chunks + c];
        }
        for (; t < count; t++)
            s0 += p[t] * tile[t * chunks + c];
        acc[c] += (s0 + s1) + (s2 + s3);
    }
}

/* Fold a tile's 16 scores into one head's running softmax; returns their probabilities. */
static inline __attribute__((always_inline)) v16 softmax_update(v16 scores, float *m, float *l,
                                                                 v16 *acc, const int chunks)
{
    const float top = max16(scores);
    const float high = top > *m ? top : *m;
    const v16 probs = exp16(scores - high);
    const float keep = exp16((v16){0} + (*m - high))[0];
    if (keep != 1.0f)
        for (int c = 0; c < chunks; c++)
            acc[c] *= keep;
    *l = *l * keep + sum16(probs);
    *m = high;
    return probs;
}

/* The float16 bits of `count` rows' scales (0 past `count`), in int32 lanes. */
static inline __attribute__((always_inline)) i16 scale_bits(const struct qdecode_args *a,
                                                            const uint8_t *rows, int count)
{
#if defined(__AVX512F__)
    /* One gather: the 4 bytes ending with each row's scale (the last two codes first,
     * so nothing past the row is read), shifted down to the scale. */
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                            12, 13, 14, 15),
                                          _mm512_set1_epi32((int)a->row));
    const __mmask16 live = (__mmask16)((1u << count) - 1u);
    const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at,
                                                      rows + a->dim - SCALE_BYTES, 1);
    return (i16)_mm512_srli_epi32(words, 16);
#else
    i16 bits = {0};
    for (int t = 0; t < count; t++) {
        uint16_t b;
        memcpy(&b, rows + t * a->row + a->dim, sizeof b);
        bits[t] = b;
    }
    return bits;
#endif
}

/* `count` rows of one KV head's codes as floats in `tile` ([16][chunks]); returns the
 * rows' scales (0 past `count`). */
static inline __attribute__((always_inline)) v16 load_tile(const struct qdecode_args *a,
                                                            const uint8_t *rows, int count,
                                                            v16 *tile, const int chunks,
                                                            const int fp8)
{
    for (int t = 0; t < count; t++)
        for (int c = 0; c < chunks; c++)
            tile[t * chunks + c] = codes16(rows + t * a->row + 16 * c, fp8);
    return half16(scale_bits(a, rows, count));
}

/* 16 cached tokens (lanes `skip..count-1` real) for every query head. Lanes before
 * `skip` get probability 0; they lie in the window's first block, which is held. */
static inline __attribute__((always_inline)) void
attend_tile16_q(const struct qdecode_args *a, const v16 *q, const uint8_t *keys,
                const uint8_t *values, int skip, int count, float *m, float *l, v16 *acc,
                const int chunks, const int fp8)
{
    static const i16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const int group = a->heads / a->kv_heads;
    v16 tile[16 * MAX_CHUNKS], probs[MAX_GROUP];
    for (int g = 0; g < a->kv_heads; g++) {
        const long offset = (long)g * (a->dim + SCALE_BYTES);
        const v16 k_scales = load_tile(a, keys + offset, count, tile, chunks, fp8) * a->scale;
        for (int j = 0; j < group; j++) {
            const int h = g * group + j;
            v16 rows[16];
            for (int t = 0; t < 16; t++) {
                v16 sum = {0};
                if (t < count)
                    for (int c = 0; c < chunks; c++)
                        sum += q[h * chunks + c] * tile[t * chunks + c];
                rows[t] = sum;
            }
            v16 scores = sum_rows(rows) * k_scales;
            if (a->softcap > 0.0f)
                for (int t = 0; t < 16; t++)
                    scores[t] = a->softcap * tanhf(scores[t] / a->softcap);
            if (count < 16)
                scores = select16(lanes < count, scores, (v16){0} - FLT_MAX);
            if (skip > 0)
                scores = select16(lanes >= skip, scores, (v16){0} - FLT_MAX);
            probs[j] = softmax_update(scores, &m[h], &l[h], acc + h * chunks, chunks);
        }
        const v16 v_scales = load_tile(a, values + offset, count, tile, chunks, fp8);
        for (int j = 0; j < group; j++) {
            float p[16] __attribute__((aligned(64)));
            const v16 weights = probs[j] * v_scales;
            memcpy(p, &weights, sizeof p);
            weighted_rows(acc + (g * group + j) * chunks, p, tile, count, chunks);
        }
    }
}

static inline __attribute__((always_inline)) void prefetch_bytes(const uint8_t *keys,
                                                                  const uint8_t *values, long size)
{
    for (long i = 0; i < size; i += 64) {
        __builtin_prefetch(keys + i);
        __builtin_prefetch(values + i);
    }
}

/* One sequence, every head, for head dims and block sizes that are multiples of 16. */
static inline __attribute__((always_inline)) void attend_seq16_q(const struct qdecode_args *a,
                                                                  const float *q, float *out,
                                                                  int seq, const int chunks,
                                                                  const int fp8)
{
    const int heads = a->heads, dim = a->dim, bs = a->block_size;
    const int length = a->seq_lens[seq];
    const int32_t *table = a->block_tables + (long)seq * a->table_stride;
    float m[MAX_HEADS], l[MAX_HEADS];
    v16 acc[MAX_HEADS * MAX_CHUNKS], qv[MAX_HEADS * MAX_CHUNKS];
    for (int h = 0; h < heads; h++) {
        m[h] = -FLT_MAX;
        l[h] = 0.0f;
    }
    for (int i = 0; i < heads * chunks; i++) {
        acc[i] = (v16){0};
        qv[i] = load16(q + 16 * i);
    }
    /* Tiles stay aligned to 16 (so none crosses a block); the first one skips the lanes
     * before the window, which lie in the window's first block. */
    const int lo = q_window_start(a, length);
    for (int start = lo / 16 * 16; start < length; start += 16) {
        const int count = length - start < 16 ? length - start : 16;
        const int skip = start < lo ? lo - start : 0;
        const int ahead = start + 16 * PREFETCH_TILES;
        if (ahead < length) {
            const long at = ((long)table[ahead / bs] * bs + ahead % bs) * a->row;
            prefetch_bytes(a->k_cache + at, a->v_cache + at, 16 * a->row);
        }
        const long first = ((long)table[start / bs] * bs + start % bs) * a->row;
        const uint8_t *keys = a->k_cache + first, *values = a->v_cache + first;
        /* Whole tiles get a constant count: their loops unroll without a branch. */
        if (count == 16 && skip == 0)
            attend_tile16_q(a, qv, keys, values, 0, 16, m, l, acc, chunks, fp8);
        else
            attend_tile16_q(a, qv, keys, values, skip, count, m, l, acc, chunks, fp8);
    }
    for (int h = 0; h < heads; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int c = 0; c < chunks; c++) {
            const v16 r = acc[h * chunks + c] * inv;
            memcpy(out + h * dim + 16 * c, &r, sizeof r);
        }
    }
}

typedef void (*seq_fn)(const struct qdecode_args *, const float *, float *, int);

/* The vector path with the chunk count and code type fixed at compile time. */
#define SEQ16Q(n, fp8)                                                                   \
    static void attend_seq16_q_##n##_##fp8(const struct qdecode_args *a, const float *q, \
                                           float *out, int seq)                          \
    {                                                                                    \
        attend_seq16_q(a, q, out, seq, n, fp8);                                          \
    }
SEQ16Q(1, 0)
SEQ16Q(2, 0)
SEQ16Q(4, 0)
SEQ16Q(8, 0)
SEQ16Q(1, 1)
SEQ16Q(2, 1)
SEQ16Q(4, 1)
SEQ16Q(8, 1)

static void attend_seq16_q_any_0(const struct qdecode_args *a, const float *q, float *out, int seq)
{
    attend_seq16_q(a, q, out, seq, a->dim / 16, 0);
}

static void attend_seq16_q_any_1(const struct qdecode_args *a, const float *q, float *out, int seq)
{
    attend_seq16_q(a, q, out, seq, a->dim / 16, 1);
}

static seq_fn vector_path(int dim, int fp8)
{
    static const seq_fn int8_fns[] = {attend_seq16_q_1_0, attend_seq16_q_2_0, attend_seq16_q_4_0,
                                      attend_seq16_q_8_0};
    static const seq_fn fp8_fns[] = {attend_seq16_q_1_1, attend_seq16_q_2_1, attend_seq16_q_4_1,
                                     attend_seq16_q_8_1};
    const int index = dim == 16 ? 0 : dim == 32 ? 1 : dim == 64 ? 2 : dim == 128 ? 3 : -1;
    if (index < 0)
        return fp8 ? attend_seq16_q_any_1 : attend_seq16_q_any_0;
    return fp8 ? fp8_fns[index] : int8_fns[index];
}

/* ---- the scalar path: any other shape ---------------------------------------------- */

static float code_value(uint8_t code, int fp8)
{
    if (!fp8)
        return (float)(int8_t)code;
    const int e = (code >> 3) & 15, m = code & 7;
    const float mag = e ? ldexpf((float)(8 + m), e - 10) : ldexpf((float)m, -9);
    return code & 0x80 ? -mag : mag;
}

static void attend_head_q(const struct qdecode_args *a, const float *q, float *out, int seq,
                          int kv_head, int fp8)
{
    const int group = a->heads / a->kv_heads, dim = a->dim, bs = a->block_size;
    const int length = a->seq_lens[seq];
    const int32_t *table = a->block_tables + (long)seq * a->table_stride;
    const long offset = (long)kv_head * (dim + SCALE_BYTES);
    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][MAX_DIM], kf[MAX_DIM], vf[MAX_DIM];
    for (int j = 0; j < group; j++) {
        m[j] = -FLT_MAX;
        l[j] = 0.0f;
        for (int d = 0; d < dim; d++)
            acc[j][d] = 0.0f;
    }
    for (int pos = q_window_start(a, length); pos < length; pos++) {
        const long at = ((long)table[pos / bs] * bs + pos % bs) * a->row + offset;
        const uint8_t *k = a->k_cache + at, *v = a->v_cache + at;
        const float k_scale = scale_at(k + dim) * a->scale, v_scale = scale_at(v + dim);
        for (int d = 0; d < dim; d++) {
            kf[d] = code_value(k[d], fp8);
            vf[d] = code_value(v[d], fp8) * v_scale;
        }
        for (int j = 0; j < group; j++) {
            float dot = 0.0f;
            for (int d = 0; d < dim; d++)
                dot += q[j * dim + d] * kf[d];
            float s = dot * k_scale;
            if (a->softcap > 0.0f)
                s = a->softcap * tanhf(s / a->softcap);
            const float high = s > m[j] ? s : m[j];
            const float keep = expf(m[j] - high), p = expf(s - high);
            for (int d = 0; d < dim; d++)
                acc[j][d] = acc[j][d] * keep + p * vf[d];
            l[j] = l[j] * keep + p;
            m[j] = high;
        }
    }
    for (int j = 0; j < group; j++) {
        const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
        for (int d = 0; d < dim; d++)
            out[j * dim + d] = acc[j][d] * inv;
    }
}

/* `fp8`: 0 for int8 codes, 1 for e4m3; `window` 0 and `softcap` 0 mean none. Returns
 * 0, or -1 when a size is outside what this kernel handles. */
int paged_decode_quant_window(const float *q, const uint8_t *k_cache, const uint8_t *v_cache,
                              const int32_t *block_tables, const int32_t *seq_lens, float *out,
                              int num_seqs, int heads, int kv_heads, int dim, int block_size,
                              int table_stride, float scale, int window, float softcap, int fp8,
                              int num_threads)
{
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || dim > MAX_DIM ||
        block_size > MAX_BLOCK || dim % 2 || (fp8 != 0 && fp8 != 1) || window < 0 ||
        softcap < 0.0f)
        return -1;
    const struct qdecode_args a = {k_cache, v_cache, block_tables, seq_lens,
                                   (long)kv_heads * (dim + SCALE_BYTES), heads, kv_heads, dim,
                                   block_size, table_stride, scale, window, softcap};
    const int group = heads / kv_heads;
    if (dim % 16 == 0 && dim <= 16 * MAX_CHUNKS && block_size % 16 == 0 && heads <= MAX_HEADS) {
        const seq_fn attend = vector_path(dim, fp8);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads)
        for (int seq = 0; seq < num_seqs; seq++) {
            const long at = (long)seq * heads * dim;
            attend(&a, q + at, out + at, seq);
        }
        return 0;
    }
    const int pairs = num_seqs * kv_heads;
#pragma omp parallel for schedule(dynamic) num_threads(num_threads)
    for (int i = 0; i < pairs; i++) {
        const int seq = i / kv_heads, kv_head = i % kv_heads;
        const long at = ((long)seq * heads + (long)kv_head * group) * dim;
        attend_head_q(&a, q + at, out + at, seq, kv_head, fp8);
    }
    return 0;
}
