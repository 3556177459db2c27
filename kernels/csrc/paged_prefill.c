/* Prefill attention over a paged KV cache, for CPUs: the new tokens of each sequence
 * over its whole context (cached prefix and the new tokens, already written to the
 * pool) in one pass, so nothing is merged afterwards.
 *
 * Work is split into items (sequence, KV head, tile of new tokens) spread over OpenMP
 * threads. An item's rows are its tokens x the query heads of its KV head (GQA: every
 * key tile is read once for all of them). The inner loop walks the context in tiles of
 * TILE keys read in place through the block table; for each tile, a register-blocked
 * GEMM gives the scores of ROWS rows x TILE keys (keys packed transposed once per tile
 * so the GEMM runs along keys), an online softmax rescales the running output, and a
 * second register-blocked GEMM adds probabilities x values (value rows read in place).
 * The causal mask is applied only on tiles that reach past the item's first query.
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

#define TILE 64      /* keys per tile: four 16-float vectors */
#define ROWS 4       /* rows per register block */
#define MAX_ROWS 128 /* rows (tokens x group) per work item, before padding */
#define MAX_DIM 256

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p)
{
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

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

/* Scratch of one work item: scaled queries, scores, running max/sum, output rows. */
struct scratch {
    float q[MAX_ROWS + ROWS][MAX_DIM];
    float s[MAX_ROWS + ROWS][TILE];
    float o[MAX_ROWS + ROWS][MAX_DIM];
    float kt[MAX_DIM][TILE];
    float m[MAX_ROWS + ROWS], l[MAX_ROWS + ROWS];
    int pos[MAX_ROWS + ROWS]; /* each row's query position */
    const float *vrow[TILE];
};

static inline long slot_of(const struct prefill_args *a, const int32_t *table, int p)
{
    return (long)table[p / a->block_size] * a->block_size + p % a->block_size;
}

/* Keys p0..p0+n of one KV head, transposed into kt[dim][TILE] (missing keys zero). */
static void pack_keys(const struct prefill_args *a, const int32_t *table, int h, int p0,
                      int n, struct scratch *w)
{
    const long row = (long)a->kv_heads * a->dim;
    for (int j = 0; j < TILE; j++) {
        if (j >= n) {
            for (int c = 0; c < a->dim; c++)
                w->kt[c][j] = 0.0f;
            w->vrow[j] = NULL;
            continue;
        }
        const long slot = slot_of(a, table, p0 + j);
        const float *k = a->k_cache + slot * row + (long)h * a->dim;
        for (int c = 0; c < a->dim; c++)
            w->kt[c][j] = k[c];
        w->vrow[j] = a->v_cache + slot * row + (long)h * a->dim;
    }
}

/* Scores of rows r..r+ROWS against the packed tile: ROWS x 4 vectors of accumulators. */
static void score_block(const struct scratch *w, int r, int dim)
{
    v16 acc[ROWS][4] = {{0}};
    for (int c = 0; c < dim; c++) {
        const v16 k0 = load16(w->kt[c]), k1 = load16(w->kt[c] + 16);
        const v16 k2 = load16(w->kt[c] + 32), k3 = load16(w->kt[c] + 48);
        for (int i = 0; i < ROWS; i++) {
            const v16 qv = splat(w->q[r + i][c]);
            acc[i][0] += qv * k0;
            acc[i][1] += qv * k1;
            acc[i][2] += qv * k2;
            acc[i][3] += qv * k3;
        }
    }
    for (int i = 0; i < ROWS; i++)
        for (int v = 0; v < 4; v++)
            store16((float *)w->s[r + i] + 16 * v, acc[i][v]);
}

/* Online softmax of one row's tile scores; keys j >= visible are masked out. */
static void softmax_row(struct scratch *w, int r, int visible, int dim)
{
    float *s = w->s[r];
    if (visible <= 0) {
        memset(s, 0, sizeof w->s[r]);
        return;
    }
    float top = -FLT_MAX;
    for (int j = 0; j < visible; j++)
        top = s[j] > top ? s[j] : top;
    const float high = top > w->m[r] ? top : w->m[r];
    const float alpha = expf(w->m[r] - high);
    float sum = 0.0f;
    for (int j = 0; j < TILE; j++) {
        const float p = j < visible ? expf(s[j] - high) : 0.0f;
        s[j] = p;
        sum += p;
    }
    if (alpha != 1.0f)
        for (int c = 0; c < dim; c++)
            w->o[r][c] *= alpha;
    w->l[r] = w->l[r] * alpha + sum;
    w->m[r] = high;
}

/* o[r..r+ROWS] += probabilities x values, 64 output columns at a time. */
static void value_block(struct scratch *w, int r, int n, int dim)
{
    for (int c0 = 0; c0 < dim; c0 += 64) {
        const int chunks = dim - c0 >= 64 ? 4 : (dim - c0) / 16;
        v16 acc[ROWS][4];
        for (int i = 0; i < ROWS; i++)
            for (int v = 0; v < chunks; v++)
                acc[i][v] = load16(w->o[r + i] + c0 + 16 * v);
        for (int j = 0; j < n; j++) {
            const float *vr = w->vrow[j] + c0;
            v16 vals[4];
            for (int v = 0; v < chunks; v++)
                vals[v] = load16(vr + 16 * v);
            for (int i = 0; i < ROWS; i++) {
                const v16 p = splat(w->s[r + i][j]);
                for (int v = 0; v < chunks; v++)
                    acc[i][v] += p * vals[v];
            }
        }
        for (int i = 0; i < ROWS; i++)
            for (int v = 0; v < chunks; v++)
                store16(w->o[r + i] + c0 + 16 * v, acc[i][v]);
    }
}

/* Scaled queries of the item in scratch, rows token-major (token, head in group),
 * padded with zero rows to a multiple of ROWS; returns the padded row count. */
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
                w->q[rows][c] = q[g * dim + c] * a->scale;
            w->pos[rows] = first_pos + t;
        }
    }
    const int padded = (rows + ROWS - 1) / ROWS * ROWS;
    for (int r = 0; r < padded; r++) {
        if (r >= rows) {
            memset(w->q[r], 0, sizeof w->q[r]);
            w->pos[r] = first_pos + it->tok1 - 1;
        }
        memset(w->o[r], 0, sizeof w->o[r]);
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
    const int end = first_pos + it->tok1;       /* keys any row of the item sees */
    const int unmasked = first_pos + it->tok0 + 1; /* keys every row sees */
    for (int p0 = 0; p0 < end; p0 += TILE) {
        const int n = end - p0 < TILE ? end - p0 : TILE;
        pack_keys(a, table, it->kv_head, p0, n, w);
        for (int r = 0; r < rows; r += ROWS)
            score_block(w, r, a->dim);
        /* Only tiles that reach past the first query's position need the mask. */
        const int masked = p0 + n > unmasked;
        for (int r = 0; r < rows; r++) {
            const int visible = masked ? w->pos[r] + 1 - p0 : n;
            softmax_row(w, r, visible < n ? visible : n, a->dim);
        }
        for (int r = 0; r < rows; r += ROWS)
            value_block(w, r, n, a->dim);
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
    const int per_item = MAX_ROWS / group; /* tokens per item */
    int count = 0;
    for (int s = 0; s < num_seqs; s++)
        count += kv_heads * ((q_start[s + 1] - q_start[s] + per_item - 1) / per_item);
    struct item *items = malloc(sizeof(struct item) * (count > 0 ? count : 1));
    if (items == NULL)
        return -1;
    int k = 0;
    for (int s = 0; s < num_seqs; s++) {
        const int n = q_start[s + 1] - q_start[s];
        const int tiles = (n + per_item - 1) / per_item;
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
