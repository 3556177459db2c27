/* Decode attention over a paged KV cache, for CPUs.
 *
 * One new query token per sequence; one call for the whole batch, sequences spread
 * over OpenMP threads. Each sequence's cached rows are streamed block by block
 * straight out of the pool (nothing gathered or padded), with an online softmax, so
 * the loop is bound by memory: the next tile is prefetched while one is computed.
 *
 * The vector path (head dim and block size multiples of 16) works on 16-token tiles:
 * the 16 dot products of a query head are summed by a shuffle tree, and the
 * exponentials are an inline polynomial. Other shapes take a plain scalar path.
 * Built with -ffast-math, so no infinities are used: scores start from -FLT_MAX.
 *
 * Layouts (float32, contiguous):
 *   q, out        [num_seqs, heads, dim]
 *   k/v caches    [num_blocks, block_size, kv_heads, dim]
 *   block_tables  [num_seqs, table_stride] int32
 *   seq_lens      [num_seqs] int32, keys visible to each sequence's query
 *
 * The entry point, ``paged_decode_window_f32``, takes a sliding window (the query
 * sees only its last ``window`` keys, its own included; 0: all) and a score cap
 * (``softcap * tanh(s / softcap)``; 0: none). Blocks wholly before the window are never read, so they may
 * already be back in the pool.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 16  /* query heads per KV head */
#define MAX_HEADS 128
#define MAX_CHUNKS 8  /* 16-float vectors per head on the vector path (dim <= 128) */
#define MAX_DIM 256
#define MAX_BLOCK 256
#ifndef PREFETCH_TILES
#define PREFETCH_TILES 1 /* how far ahead (in 16-token tiles) keys and values are fetched */
#endif

struct decode_args {
    const float *k_cache, *v_cache;
    const int32_t *block_tables, *seq_lens;
    long row;  /* floats per cached token: kv_heads * dim */
    int heads, kv_heads, dim, block_size, table_stride;
    float scale;
    int window;    /* keys visible to the query, its own included; 0: all */
    float softcap; /* 0: scores uncapped */
};

/* The first key position the query of a ``length``-token sequence sees. */
static inline int window_start(const struct decode_args *a, int length)
{
    return a->window > 0 && length > a->window ? length - a->window : 0;
}

static inline float capped(const struct decode_args *a, float score)
{
    return a->softcap > 0.0f ? a->softcap * tanhf(score / a->softcap) : score;
}

static void attend_block(const struct decode_args *a, const float *q, const float *keys,
                         const float *values, int count, int group, float *m, float *l,
                         float acc[][MAX_DIM])
{
    float p[MAX_GROUP][MAX_BLOCK];
    const int dim = a->dim;
    for (int t = 0; t < count; t++) {
        const float *k = keys + t * a->row;
        for (int j = 0; j < group; j++) {
            const float *qj = q + j * dim;
            float dot = 0.0f;
            for (int d = 0; d < dim; d++)
                dot += qj[d] * k[d];
            p[j][t] = capped(a, dot * a->scale);
        }
    }
    for (int j = 0; j < group; j++) {
        float top = -FLT_MAX;
        for (int t = 0; t < count; t++)
            top = p[j][t] > top ? p[j][t] : top;
        const float high = top > m[j] ? top : m[j];
        const float keep = expf(m[j] - high);
        float sum = 0.0f;
        for (int t = 0; t < count; t++) {
            p[j][t] = expf(p[j][t] - high);
            sum += p[j][t];
        }
        if (keep != 1.0f)
            for (int d = 0; d < dim; d++)
                acc[j][d] *= keep;
        l[j] = l[j] * keep + sum;
        m[j] = high;
    }
    for (int t = 0; t < count; t++) {
        const float *v = values + t * a->row;
        for (int j = 0; j < group; j++) {
            const float w = p[j][t];
            for (int d = 0; d < dim; d++)
                acc[j][d] += w * v[d];
        }
    }
}

/* ---- the vector path: head dims and block sizes that are multiples of 16 ---------- */

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) v16 load16(const float *p)
{
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* out[t] = sum of the lanes of rows[t]: a 16x16 transpose folded into four shuffle-add
 * levels (45 vector ops instead of 16 separate horizontal sums). */
static inline __attribute__((always_inline)) v16 sum_rows(const v16 rows[16])
{
    static const i16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    static const i16 hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    static const i16 lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    static const i16 hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    static const i16 lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    static const i16 hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    static const i16 lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    static const i16 hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = __builtin_shuffle(rows[2 * i], rows[2 * i + 1], lo1) +
               __builtin_shuffle(rows[2 * i], rows[2 * i + 1], hi1);
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo2) +
               __builtin_shuffle(a[2 * i], a[2 * i + 1], hi2);
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo3) +
               __builtin_shuffle(b[2 * i], b[2 * i + 1], hi3);
    return __builtin_shuffle(c[0], c[1], lo4) + __builtin_shuffle(c[0], c[1], hi4);
}

static inline __attribute__((always_inline)) v16 select16(i16 mask, v16 yes, v16 no)
{
    return (v16)(((i16)yes & mask) | ((i16)no & ~mask));
}

static inline __attribute__((always_inline)) float max16(v16 v)
{
    static const i16 s8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    static const i16 s4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    static const i16 s2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    static const i16 s1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    v16 o;
    o = __builtin_shuffle(v, s8), v = select16(v > o, v, o);
    o = __builtin_shuffle(v, s4), v = select16(v > o, v, o);
    o = __builtin_shuffle(v, s2), v = select16(v > o, v, o);
    o = __builtin_shuffle(v, s1), v = select16(v > o, v, o);
    return v[0];
}

/* e^x for x <= 0 in every lane, inline (a library call would spill every vector
 * register): 2^(x log2 e) split into an integer power of two and 2^f, |f| <= 1/2, by
 * a degree-6 Taylor polynomial (relative error ~1e-7). Lanes below -87 give ~1e-38.
 * Rounding is by conversion to integers: -ffast-math may fold float tricks away. */
static inline __attribute__((always_inline)) v16 exp16(v16 x)
{
    const v16 low = (v16){0} - 87.0f, zero = {0};
    x = select16(x < low, low, x);
    x = select16(x > zero, zero, x);
    const v16 y = x * 1.44269504088896341f;
    const i16 whole = __builtin_convertvector(y - 0.5f, i16); /* nearest, for y <= 0 */
    const v16 f = (y - __builtin_convertvector(whole, v16)) * 0.69314718055994531f;
    v16 p = f * (1.0f / 720.0f) + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    return (v16)((i16)p + (whole << 23));
}

/* Ask for the next tile's keys and values while this one is computed: the loop is
 * otherwise bound by waiting on memory. */
static inline __attribute__((always_inline)) void prefetch_tile(const float *keys,
                                                                 const float *values, long size)
{
    for (long i = 0; i < size; i += 16) {
        __builtin_prefetch(keys + i);
        __builtin_prefetch(values + i);
    }
}

/* Scores of 16 cached tokens (lanes ``skip..count-1`` real) for query head ``h``,
 * softmax-updated: returns their unnormalized probabilities and rescales the head's
 * running state. */
static inline __attribute__((always_inline)) v16
tile_probs(const struct decode_args *a, const v16 *qh, const float *keys, int skip, int count,
           float *m, float *l, v16 *acc, const int chunks)
{
    static const i16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16 rows[16];
    for (int t = 0; t < 16; t++) {
        v16 sum = {0};
        if (t < count)
            for (int c = 0; c < chunks; c++)
                sum += qh[c] * load16(keys + t * a->row + 16 * c);
        rows[t] = sum;
    }
    v16 scores = sum_rows(rows) * a->scale;
    if (a->softcap > 0.0f)
        for (int t = 0; t < 16; t++)
            scores[t] = capped(a, scores[t]);
    if (count < 16)
        scores = select16(lanes < count, scores, (v16){0} - FLT_MAX);
    if (skip > 0)
        scores = select16(lanes >= skip, scores, (v16){0} - FLT_MAX);
    const float top = max16(scores);
    const float high = top > *m ? top : *m;
    const v16 probs = exp16(scores - high);
    const float keep = exp16((v16){0} + (*m - high))[0];
    if (keep != 1.0f)
        for (int c = 0; c < chunks; c++)
            acc[c] *= keep;
    v16 folded = probs;
    folded += __builtin_shuffle(folded, (i16){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    folded += __builtin_shuffle(folded, (i16){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    folded += __builtin_shuffle(folded, (i16){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    folded += __builtin_shuffle(folded, (i16){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    *l = *l * keep + folded[0];
    *m = high;
    return probs;
}

/* 16 cached tokens (lanes ``skip..count-1`` real) for every query head; ``q``/``acc``
 * hold ``heads x chunks`` vectors. Values are summed per head in independent
 * accumulators. */
static inline __attribute__((always_inline)) void
attend_tile16(const struct decode_args *a, const v16 *q, const float *keys, const float *values,
              int skip, int count, float *m, float *l, v16 *acc, const int chunks)
{
    const int group = a->heads / a->kv_heads;
    for (int h = 0; h < a->heads; h++) {
        const long offset = (long)(h / group) * a->dim;
        const v16 probs = tile_probs(a, q + h * chunks, keys + offset, skip, count, &m[h],
                                     &l[h], acc + h * chunks, chunks);
        float p[16] __attribute__((aligned(64)));
        memcpy(p, &probs, sizeof p);
        const float *vh = values + offset;
        for (int c = 0; c < chunks; c++) {
            v16 even = {0}, odd = {0};
            int t = skip;
            for (; t + 1 < count; t += 2) {
                even += p[t] * load16(vh + t * a->row + 16 * c);
                odd += p[t + 1] * load16(vh + (t + 1) * a->row + 16 * c);
            }
            if (t < count)
                even += p[t] * load16(vh + t * a->row + 16 * c);
            acc[h * chunks + c] += even + odd;
        }
    }
}

/* One sequence, every head, for head dims and block sizes that are multiples of 16. */
static inline __attribute__((always_inline)) void
attend_seq16(const struct decode_args *a, const float *q, float *out, int seq, const int chunks)
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
    const int lo = window_start(a, length);
    for (int start = lo / 16 * 16; start < length; start += 16) {
        const int count = length - start < 16 ? length - start : 16;
        const int skip = start < lo ? lo - start : 0;
        const int ahead = start + 16 * PREFETCH_TILES;
        if (ahead < length) {
            const long at = ((long)table[ahead / bs] * bs + ahead % bs) * a->row;
            prefetch_tile(a->k_cache + at, a->v_cache + at, 16 * a->row);
        }
        const long first = ((long)table[start / bs] * bs + start % bs) * a->row;
        attend_tile16(a, qv, a->k_cache + first, a->v_cache + first, skip, count, m, l, acc,
                      chunks);
    }
    for (int h = 0; h < heads; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int c = 0; c < chunks; c++) {
            const v16 r = acc[h * chunks + c] * inv;
            memcpy(out + h * dim + 16 * c, &r, sizeof r);
        }
    }
}

/* The vector path with the head dim's chunk count fixed at compile time. */
#define SEQ16(n)                                                                     \
    static void attend_seq16_##n(const struct decode_args *a, const float *q, float *out, \
                                 int seq)                                            \
    {                                                                                \
        attend_seq16(a, q, out, seq, n);                                             \
    }
SEQ16(1)
SEQ16(2)
SEQ16(4)
SEQ16(8)

static void attend_seq16_any(const struct decode_args *a, const float *q, float *out, int seq)
{
    attend_seq16(a, q, out, seq, a->dim / 16);
}

/* ---- the scalar path: any other shape ---------------------------------------------- */

static void attend_head(const struct decode_args *a, const float *q, float *out, int seq,
                        int kv_head)
{
    const int group = a->heads / a->kv_heads, dim = a->dim, bs = a->block_size;
    const int length = a->seq_lens[seq];
    const int32_t *table = a->block_tables + (long)seq * a->table_stride;
    float m[MAX_GROUP], l[MAX_GROUP], acc[MAX_GROUP][MAX_DIM];
    for (int j = 0; j < group; j++) {
        m[j] = -FLT_MAX;
        l[j] = 0.0f;
        for (int d = 0; d < dim; d++)
            acc[j][d] = 0.0f;
    }
    for (int start = window_start(a, length); start < length;) {
        const int in_block = bs - start % bs;
        const int count = length - start < in_block ? length - start : in_block;
        const long first =
            ((long)table[start / bs] * bs + start % bs) * a->row + (long)kv_head * dim;
        attend_block(a, q, a->k_cache + first, a->v_cache + first, count, group, m, l, acc);
        start += count;
    }
    for (int j = 0; j < group; j++) {
        const float inv = l[j] > 0.0f ? 1.0f / l[j] : 0.0f;
        for (int d = 0; d < dim; d++)
            out[j * dim + d] = acc[j][d] * inv;
    }
}

/* Returns 0, or -1 when a size is outside what this kernel handles. */
int paged_decode_window_f32(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *block_tables, const int32_t *seq_lens, float *out,
                            int num_seqs, int heads, int kv_heads, int dim, int block_size,
                            int table_stride, float scale, int window, float softcap,
                            int num_threads)
{
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || dim > MAX_DIM ||
        block_size > MAX_BLOCK || window < 0 || softcap < 0.0f)
        return -1;
    const struct decode_args a = {k_cache, v_cache, block_tables, seq_lens,
                                  (long)kv_heads * dim, heads, kv_heads, dim, block_size,
                                  table_stride, scale, window, softcap};
    const int group = heads / kv_heads;
    if (dim % 16 == 0 && dim <= 16 * MAX_CHUNKS && block_size % 16 == 0 && heads <= MAX_HEADS) {
        void (*attend)(const struct decode_args *, const float *, float *, int) =
            dim == 16 ? attend_seq16_1
            : dim == 32 ? attend_seq16_2
            : dim == 64 ? attend_seq16_4
            : dim == 128 ? attend_seq16_8
                         : attend_seq16_any;
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
        attend_head(&a, q + at, out + at, seq, kv_head);
    }
    return 0;
}
