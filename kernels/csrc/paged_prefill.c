/* Prefill attention over a paged KV cache, for CPUs: the new tokens of each sequence
 * over its whole context (cached prefix and the new tokens, already written to the
 * pool) in one pass, so nothing is merged afterwards.
 *
 * Work is split into items (sequence, KV head, tile of new tokens) spread over OpenMP
 * threads. An item's rows are its tokens x the query heads of its KV head (GQA: every
 * key tile is read once for all of them). Rows lie along the vector lanes: queries
 * are kept transposed ([dim][row]) and scores as [key][row], so the keys and values
 * of a tile are read in place through the block table (one key element broadcast
 * against 16 rows at a time; nothing is packed or transposed per tile) and the
 * online softmax runs 16 rows per vector. Per tile of TILE keys: a register-blocked
 * GEMM gives the scores, the softmax turns them into probabilities and rescales the
 * running output, and a second register-blocked GEMM adds probabilities x values.
 * The causal mask is applied only on tiles that reach past the item's first query.
 *
 * Each row's arithmetic (its tiles, their order, its running max and sum) depends
 * only on its own query and context, not on the other rows of its item, so a step
 * chunked or batched differently gives the same bits for the same positions.
 *
 * Vectors are GCC vector extensions of 16 floats, lowered to whatever the build target
 * has (AVX-512, AVX2, NEON). Built with -ffast-math: no infinities, masked scores are
 * -FLT_MAX and their probabilities are set to zero explicitly.
 *
 * Layouts (float32, contiguous):
 *   q, out        [num_tokens, heads, dim], sequence i owning rows q_start[i]..q_start[i+1]
 *   k/v caches    [num_blocks, block_size, kv_heads, dim]
 *   block_tables  [num_seqs, table_stride] int32
 *   seq_lens      [num_seqs] int32: context length, the sequence's new tokens included
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64      /* keys per tile */
#define ROWS 4       /* rows per value register block */
#define MAX_ROWS 256 /* rows (tokens x group) per work item; a multiple of 16 */
#define PAD 16       /* floats after each scratch row: rows 2 KiB apart would share cache sets */
#define MAX_DIM 256
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static const float zero_row[MAX_DIM]; /* the keys and values past a context's end */

ALWAYS_INLINE v16 load16(const float *p)
{
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

ALWAYS_INLINE void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

ALWAYS_INLINE v16 splat(float x) { return x - (v16){0}; }

/* a where keep is all ones, b where it is zero (lane masks from vector compares). */
ALWAYS_INLINE v16 select16(v16i keep, v16 a, v16 b)
{
    return (v16)(((v16i)a & keep) | ((v16i)b & ~keep));
}

/* A lane loop, which the compiler turns into one max instruction (a select through
 * compare masks costs three, on the softmax's critical path). */
ALWAYS_INLINE v16 max16(v16 a, v16 b)
{
    v16 r;
    for (int i = 0; i < 16; i++)
        r[i] = a[i] > b[i] ? a[i] : b[i];
    return r;
}

/* e^x of each lane, for x <= 0 (scores minus their running max): x = n ln2 + y with
 * |y| <= ln2 / 2, e^y by its Taylor series to degree 6 (relative error ~1e-7, about
 * float precision), scaled by 2^n through the exponent bits. Below -87 the result is
 * e^-87, which only masked or negligible lanes reach (masked ones are zeroed after). */
ALWAYS_INLINE v16 exp16(v16 x)
{
    x = max16(x, splat(-87.0f));
    const v16 t = x * 1.44269504f + 0.5f;
    v16 n = __builtin_convertvector(__builtin_convertvector(t, v16i), v16); /* toward 0 */
    n -= select16(n > t, splat(1.0f), (v16){0}); /* floor(x log2 e + 1/2) */
    const v16 y = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16 p = 1.0f / 720 + y * 0.0f;
    p = p * y + 1.0f / 120;
    p = p * y + 1.0f / 24;
    p = p * y + 1.0f / 6;
    p = p * y + 0.5f;
    p = p * y + 1.0f;
    p = p * y + 1.0f;
    return (v16)((v16i)p + (__builtin_convertvector(n, v16i) << 23));
}

struct prefill_args {
    const float *q, *k_cache, *v_cache;
    const int32_t *block_tables, *seq_lens, *q_start;
    float *out;
    int heads, kv_heads, dim, block_size, table_stride;
    float scale;
};

struct item {
    int seq, kv_head, tok0, tok1; /* new tokens tok0..tok1 of the sequence */
};

/* Scratch of one work item. Rows are the item's (token, head) pairs; queries and
 * scores keep rows along the vector lanes, so a tile's keys are read in place
 * (broadcast one element at a time) and the softmax runs 16 rows at once. */
struct scratch {
    float qt[MAX_DIM][MAX_ROWS + PAD]; /* scaled queries, transposed */
    float st[TILE][MAX_ROWS + PAD];    /* one tile's scores, then its probabilities */
    float o[MAX_ROWS][MAX_DIM + PAD];  /* running outputs */
    float m[MAX_ROWS], l[MAX_ROWS], alpha[MAX_ROWS];
    int32_t pos[MAX_ROWS]; /* each row's query position */
    const float *krow[TILE], *vrow[TILE];
};

/* Where the keys and values of positions p0..p0+TILE are; past n, a zero row. */
static void locate_tile(const struct prefill_args *a, const int32_t *table, int h, int p0,
                        int n, struct scratch *w)
{
    const long row = (long)a->kv_heads * a->dim;
    int block = p0 / a->block_size, offset = p0 % a->block_size;
    for (int j = 0; j < TILE; j++) {
        if (j >= n) {
            w->krow[j] = w->vrow[j] = zero_row;
            continue;
        }
        const long at = ((long)table[block] * a->block_size + offset) * row + (long)h * a->dim;
        w->krow[j] = a->k_cache + at;
        w->vrow[j] = a->v_cache + at;
        if (++offset == a->block_size) {
            offset = 0;
            block++;
        }
    }
}

/* Asks for the cache lines of the keys and values at positions p0..end (at most a
 * tile) ahead of their use. Issued before a tile's value pass, they arrive while it
 * runs: the next tile's keys are then read from cache, not memory (1.1x at 8k
 * context and head dim 64, 1.5x at 200k and head dim 16, one core). Inlined: GCC
 * takes a function that only prefetches for one without effect and drops its calls. */
ALWAYS_INLINE void prefetch_tile(const struct prefill_args *a, const int32_t *table, int h,
                                 int p0, int end)
{
    const long row = (long)a->kv_heads * a->dim;
    const int n = end - p0 < TILE ? end - p0 : TILE;
    int block = p0 / a->block_size, offset = p0 % a->block_size;
    for (int j = 0; j < n; j++) {
        const long at = ((long)table[block] * a->block_size + offset) * row + (long)h * a->dim;
        for (int c = 0; c < a->dim; c += 16) {
            __builtin_prefetch(a->k_cache + at + c);
            __builtin_prefetch(a->v_cache + at + c);
        }
        if (++offset == a->block_size) {
            offset = 0;
            block++;
        }
    }
}

/* Scores of keys j0..j0+keys against row vectors v0..v0+vecs (keys <= 8, vecs <= 4,
 * keys x vecs <= 16; constants where inlined, so the accumulators stay in registers). */
ALWAYS_INLINE void score_block(struct scratch *w, int j0, int keys, int v0, int vecs, int dim)
{
    v16 acc[8][4];
    const float *k[8];
    for (int i = 0; i < keys; i++) {
        k[i] = w->krow[j0 + i];
        for (int v = 0; v < vecs; v++)
            acc[i][v] = (v16){0};
    }
    for (int c = 0; c < dim; c++) {
        const float *q = w->qt[c] + 16 * v0;
        for (int v = 0; v < vecs; v++) {
            const v16 qv = load16(q + 16 * v);
            for (int i = 0; i < keys; i++)
                acc[i][v] += splat(k[i][c]) * qv;
        }
    }
    for (int i = 0; i < keys; i++)
        for (int v = 0; v < vecs; v++)
            store16(w->st[j0 + i] + 16 * (v0 + v), acc[i][v]);
}

static void score_tile(struct scratch *w, int vectors, int dim)
{
    int v0 = 0;
    for (; v0 + 4 <= vectors; v0 += 4)
        for (int j0 = 0; j0 < TILE; j0 += 4)
            score_block(w, j0, 4, v0, 4, dim);
    for (int j0 = 0; j0 < TILE; j0 += 8) {
        switch (vectors - v0) {
        case 3: score_block(w, j0, 4, v0, 3, dim); score_block(w, j0 + 4, 4, v0, 3, dim); break;
        case 2: score_block(w, j0, 8, v0, 2, dim); break;
        case 1: score_block(w, j0, 8, v0, 1, dim); break;
        default: break;
        }
    }
}

/* Online softmax of 16 rows over the tile: the running max and sum move on, the
 * scores become probabilities, and alpha says how much the running output shrinks.
 * With mask, a key at position p counts for a row only when p <= the row's position. */
static void softmax_vector(struct scratch *w, int v, int p0, int mask)
{
    const int r = 16 * v;
    const v16i pos = (v16i)load16((const float *)&w->pos[r]);
    const v16 lowest = splat(-FLT_MAX);
    const v16 old = load16(&w->m[r]);
    v16 top = old, top2 = old; /* two chains: each max waits on the one before */
    for (int j = 0; j < TILE; j += 2) {
        v16 s = load16(&w->st[j][r]), s2 = load16(&w->st[j + 1][r]);
        if (mask) {
            store16(&w->st[j][r], s = select16(pos >= p0 + j, s, lowest));
            store16(&w->st[j + 1][r], s2 = select16(pos >= p0 + j + 1, s2, lowest));
        }
        top = max16(top, s);
        top2 = max16(top2, s2);
    }
    top = max16(top, top2);
    v16 sum = {0};
    for (int j = 0; j < TILE; j++) {
        v16 p = exp16(load16(&w->st[j][r]) - top);
        if (mask)
            p = select16(pos >= p0 + j, p, (v16){0});
        store16(&w->st[j][r], p);
        sum += p;
    }
    const v16 alpha = exp16(old - top);
    store16(&w->alpha[r], alpha);
    store16(&w->l[r], load16(&w->l[r]) * alpha + sum);
    store16(&w->m[r], top);
}

/* o[r..r+ROWS][c0..c0+64] += probabilities x values. */
ALWAYS_INLINE void value_block64(struct scratch *w, int r, int c0)
{
    v16 a0[ROWS], a1[ROWS], a2[ROWS], a3[ROWS];
    for (int i = 0; i < ROWS; i++) {
        const float alpha = w->alpha[r + i];
        a0[i] = load16(w->o[r + i] + c0) * alpha;
        a1[i] = load16(w->o[r + i] + c0 + 16) * alpha;
        a2[i] = load16(w->o[r + i] + c0 + 32) * alpha;
        a3[i] = load16(w->o[r + i] + c0 + 48) * alpha;
    }
    for (int j = 0; j < TILE; j++) {
        const float *vr = w->vrow[j] + c0;
        const v16 v0 = load16(vr), v1 = load16(vr + 16), v2 = load16(vr + 32), v3 = load16(vr + 48);
        for (int i = 0; i < ROWS; i++) {
            const v16 p = splat(w->st[j][r + i]);
            a0[i] += p * v0;
            a1[i] += p * v1;
            a2[i] += p * v2;
            a3[i] += p * v3;
        }
    }
    for (int i = 0; i < ROWS; i++) {
        store16(w->o[r + i] + c0, a0[i]);
        store16(w->o[r + i] + c0 + 16, a1[i]);
        store16(w->o[r + i] + c0 + 32, a2[i]);
        store16(w->o[r + i] + c0 + 48, a3[i]);
    }
}

/* The same for 16 output columns of `rows` rows (head dims that are not a multiple
 * of 64; rows a constant where inlined). */
ALWAYS_INLINE void value_block16(struct scratch *w, int r, int rows, int c0)
{
    v16 acc[8];
    for (int i = 0; i < rows; i++)
        acc[i] = load16(w->o[r + i] + c0) * w->alpha[r + i];
    for (int j = 0; j < TILE; j++) {
        const v16 vals = load16(w->vrow[j] + c0);
        for (int i = 0; i < rows; i++)
            acc[i] += splat(w->st[j][r + i]) * vals;
    }
    for (int i = 0; i < rows; i++)
        store16(w->o[r + i] + c0, acc[i]);
}

static void value_tile(struct scratch *w, int rows, int dim)
{
    const int wide = dim / 64 * 64;
    for (int r = 0; r < rows; r += ROWS)
        for (int c0 = 0; c0 < wide; c0 += 64)
            value_block64(w, r, c0);
    for (int c0 = wide; c0 < dim; c0 += 16) {
        int r = 0;
        for (; r + 8 <= rows; r += 8)
            value_block16(w, r, 8, c0);
        if (r < rows)
            value_block16(w, r, ROWS, c0);
    }
}

/* Scaled queries of the item, transposed into scratch, rows token-major (token, head
 * in group), padded with zero rows to a multiple of 16; returns the padded count. */
static int load_queries(const struct prefill_args *a, const struct item *it, int first_pos,
                        struct scratch *w)
{
    const int group = a->heads / a->kv_heads, dim = a->dim;
    int rows = 0;
    for (int t = it->tok0; t < it->tok1; t++) {
        const float *q = a->q + ((long)(a->q_start[it->seq] + t) * a->heads
                                 + (long)it->kv_head * group) * dim;
        for (int g = 0; g < group; g++, rows++) {
            for (int c = 0; c < dim; c++)
                w->qt[c][rows] = q[g * dim + c] * a->scale;
            w->pos[rows] = first_pos + t;
        }
    }
    const int padded = (rows + 15) / 16 * 16;
    for (int r = 0; r < padded; r++) {
        if (r >= rows) {
            for (int c = 0; c < dim; c++)
                w->qt[c][r] = 0.0f;
            w->pos[r] = first_pos + it->tok1 - 1;
        }
        memset(w->o[r], 0, sizeof(float) * dim);
        w->m[r] = -FLT_MAX;
        w->l[r] = 0.0f;
    }
    return padded;
}

static void write_output(const struct prefill_args *a, const struct item *it,
                         const struct scratch *w)
{
    const int group = a->heads / a->kv_heads, dim = a->dim;
    int r = 0;
    for (int t = it->tok0; t < it->tok1; t++) {
        float *out = a->out + ((long)(a->q_start[it->seq] + t) * a->heads
                               + (long)it->kv_head * group) * dim;
        for (int g = 0; g < group; g++, r++) {
            const float inv = 1.0f / w->l[r];
            for (int c = 0; c < dim; c++)
                out[g * dim + c] = w->o[r][c] * inv;
        }
    }
}

static void run_item(const struct prefill_args *a, const struct item *it, struct scratch *w)
{
    const int total = a->seq_lens[it->seq];
    const int new_tokens = a->q_start[it->seq + 1] - a->q_start[it->seq];
    const int first_pos = total - new_tokens;
    const int32_t *table = a->block_tables + (long)it->seq * a->table_stride;
    const int rows = load_queries(a, it, first_pos, w);
    const int real_rows = (it->tok1 - it->tok0) * (a->heads / a->kv_heads);
    const int value_rows = (real_rows + ROWS - 1) / ROWS * ROWS;
    const int end = first_pos + it->tok1;          /* keys any row of the item sees */
    const int unmasked = first_pos + it->tok0 + 1; /* keys every row sees */
    for (int p0 = 0; p0 < end; p0 += TILE) {
        const int n = end - p0 < TILE ? end - p0 : TILE;
        locate_tile(a, table, it->kv_head, p0, n, w);
        score_tile(w, rows / 16, a->dim);
        /* Only tiles that reach past the first query's position need the mask (a
         * short last tile's zero rows lie past every row's position). */
        const int mask = p0 + TILE > unmasked;
        for (int v = 0; v < rows / 16; v++)
            softmax_vector(w, v, p0, mask);
        if (p0 + TILE < end)
            prefetch_tile(a, table, it->kv_head, p0 + TILE, end);
        value_tile(w, value_rows, a->dim);
    }
    write_output(a, it, w);
}
/* Each thread's scratch, allocated on its first call and kept: it is large enough
 * (hundreds of KiB) that allocating it per call would map fresh pages every layer. */
static struct scratch *thread_scratch(void)
{
    static _Thread_local struct scratch *mine;
    if (mine == NULL)
        mine = aligned_alloc(64, (sizeof(struct scratch) + 63) / 64 * 64);
    return mine;
}

/* Tiles n new tokens are cut into: enough for per_item tokens each, at least spread
 * when there are that many tokens. */
static int token_tiles(int n, int per_item, int spread)
{
    const int needed = (n + per_item - 1) / per_item;
    const int wanted = spread < n ? spread : n;
    return needed > wanted ? needed : wanted;
}

/* Returns 0, or -1 when the shapes are outside what this kernel takes. */
int paged_prefill_f32(const float *q, const float *k_cache, const float *v_cache,
                      const int32_t *block_tables, const int32_t *seq_lens,
                      const int32_t *q_start, float *out, int num_seqs, int heads,
                      int kv_heads, int dim, int block_size, int table_stride, float scale,
                      int threads)
{
    const int group = kv_heads > 0 ? heads / kv_heads : 0;
    if (group <= 0 || group * kv_heads != heads || group > MAX_ROWS || dim % 16 || dim > MAX_DIM)
        return -1;
    const struct prefill_args a = {q, k_cache, v_cache, block_tables, seq_lens, q_start, out,
                                   heads, kv_heads, dim, block_size, table_stride, scale};
    /* A sequence's tokens are split in even token tiles of at most MAX_ROWS rows, and
     * in more when its KV heads alone would leave threads without an item. */
    const int per_item = MAX_ROWS / group;
    const int spread = (threads + kv_heads * num_seqs - 1) / (kv_heads * num_seqs);
    int count = 0;
    for (int s = 0; s < num_seqs; s++)
        count += kv_heads * token_tiles(q_start[s + 1] - q_start[s], per_item, spread);
    struct item *items = malloc(sizeof(struct item) * (count > 0 ? count : 1));
    if (items == NULL)
        return -1;
    int k = 0;
    for (int s = 0; s < num_seqs; s++) {
        const int n = q_start[s + 1] - q_start[s];
        const int tiles = token_tiles(n, per_item, spread);
        for (int t = 0; t < tiles; t++) /* even tiles: n tokens split tiles ways */
            for (int h = 0; h < kv_heads; h++)
                items[k++] = (struct item){s, h, n * t / tiles, n * (t + 1) / tiles};
    }
    int status = 0;
#pragma omp parallel num_threads(threads)
    {
        struct scratch *w = thread_scratch();
        if (w == NULL) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < count; i++)
            if (w != NULL)
                run_item(&a, &items[i], w);
    }
    free(items);
    return status;
}
