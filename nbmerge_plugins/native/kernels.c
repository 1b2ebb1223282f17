/* Fused CPU kernels for TIES over float32 or bfloat16 tensors, computing in float32.
 *
 * The torch formulation of TIES runs about 25 elementwise operations per block of task vectors, each a pass over
 * memory; these kernels make one pass per stage instead, over tiles of TILE positions kept in the L1/L2 cache,
 * with branch-free inner loops the compiler vectorises. They compute exactly what plugins/ties.py's torch path
 * computes (that path's docstrings state the formulas); tests/test_kernels.py compares the two.
 *
 * Inputs: n models (x_i), the base (b), each float32 or bfloat16 (a dtype code per tensor: DTYPE_F32,
 * DTYPE_BF16), float32 weights w_i; τ_i = w_i (x_i − b) computed as (x_i − b) · w_i in float32, like the torch
 * path. Outputs are float32, or bfloat16 rounded to nearest even (as torch converts). Loaded through ctypes (which releases the GIL while a kernel runs), so the
 * engine's reader and writer threads keep working meanwhile. No allocation, no global state: reentrant.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 1024
#define MAX_MODELS 16 /* rows of a tile kept on the stack; more models take the torch path */

/* Each vectorised function is compiled for AVX-512 (x86-64-v4, whose 64-bit multiplies DARE's draws need), AVX2
 * and the baseline; the loader picks the widest the CPU has. setup.py compiles without FMA contraction, so every
 * clone rounds the same way. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

/* A tile of an input as float32: a pointer into it when it is float32, else converted into `scratch`. */
VECTOR_CLONES
static const float *input_tile(const void *tensor, int dtype, int64_t start, int64_t len, float *scratch) {
    if (dtype == DTYPE_F32) return (const float *)tensor + start;
    const uint16_t *bits = (const uint16_t *)tensor + start;
    uint32_t *widened = (uint32_t *)scratch;
    for (int64_t j = 0; j < len; j++) widened[j] = (uint32_t)bits[j] << 16;
    return scratch;
}

/* Writes a float32 tile into the output as float32, or as bfloat16 rounded to nearest even (NaN -> 0x7FC0). */
VECTOR_CLONES
static void store_tile(void *out, int dtype, int64_t start, int64_t len, const float *values) {
    if (dtype == DTYPE_F32) {
        memcpy((float *)out + start, values, sizeof(float) * (size_t)len);
        return;
    }
    uint16_t *bits = (uint16_t *)out + start;
    for (int64_t j = 0; j < len; j++) {
        uint32_t u;
        memcpy(&u, &values[j], sizeof u);
        uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        bits[j] = values[j] != values[j] ? (uint16_t)0x7FC0 : rounded;
    }
}

static inline float sign_of(float v) { return (float)(v > 0.0f) - (float)(v < 0.0f); }

/* The τ_i of one tile, trimmed: |τ| >= threshold keeps τ, otherwise 0 (torch's mul gives τ · 0, a signed zero;
 * no step below tells the two zeros apart). */
VECTOR_CLONES
static void trimmed_tile(int64_t len, const float *model, const float *base, float weight, float threshold,
                         float *out) {
    for (int64_t j = 0; j < len; j++) {
        float tau = (model[j] - base[j]) * weight;
        out[j] = fabsf(tau) >= threshold || tau != tau ? tau : 0.0f; /* NaN is kept: it propagates, as in torch */
    }
}

/* γ per position from the trimmed rows: sign of Σ τ̂_i (by_count = 0) or of Σ sign(τ̂_i); 0 becomes tie_sign. */
VECTOR_CLONES
static void elect_tile(int64_t n, int64_t len, float trimmed[][TILE], int by_count, float tie_sign,
                       float *elected) {
    for (int64_t j = 0; j < len; j++) elected[j] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float *row = trimmed[i];
        if (by_count)
            for (int64_t j = 0; j < len; j++) elected[j] += sign_of(row[j]);
        else
            for (int64_t j = 0; j < len; j++) elected[j] += row[j];
    }
    for (int64_t j = 0; j < len; j++) {
        float s = sign_of(elected[j]);
        elected[j] = s == 0.0f ? tie_sign : s;
    }
}

/* merge_func: 0 = mean (Σ agreeing τ̂ / Σ agreeing w), 1 = sum, 2 = max (γ · max agreeing |τ̂|). */
VECTOR_CLONES
static void disjoint_tile(int64_t n, int64_t len, float trimmed[][TILE], const float *elected,
                          const float *weights, int merge_func, float *combined, float *divisor) {
    for (int64_t j = 0; j < len; j++) combined[j] = 0.0f, divisor[j] = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        const float *row = trimmed[i];
        const float weight = weights[i];
        if (merge_func == 2) {
            for (int64_t j = 0; j < len; j++) {
                float kept = fabsf(row[j]) * (float)(sign_of(row[j]) == elected[j]);
                combined[j] = kept > combined[j] || kept != kept ? kept : combined[j];
            }
        } else {
            for (int64_t j = 0; j < len; j++) {
                float agrees = (float)(sign_of(row[j]) == elected[j]);
                combined[j] += row[j] * agrees;
                divisor[j] += weight * agrees;
            }
        }
    }
    if (merge_func == 0)
        for (int64_t j = 0; j < len; j++) combined[j] /= divisor[j] == 0.0f ? 1.0f : divisor[j];
    else if (merge_func == 2)
        for (int64_t j = 0; j < len; j++) combined[j] *= elected[j];
}

/* combined = θ_0 + λ · disjoint_merge(trimmed, γ) over one tile. */
static void merged_tile(int64_t n, int64_t len, float trimmed[][TILE], const float *elected, const float *b,
                        const float *weights, int merge_func, float scaling, float *combined, float *divisor) {
    disjoint_tile(n, len, trimmed, elected, weights, merge_func, combined, divisor);
    if (scaling == 1.0f)
        for (int64_t j = 0; j < len; j++) combined[j] = b[j] + combined[j];
    else
        for (int64_t j = 0; j < len; j++) combined[j] = b[j] + scaling * combined[j];
}

/* The trimmed rows and γ of the tile at `start`; returns the base tile (a pointer into the base, or
 * base_scratch). */
static const float *trim_and_elect(int64_t n, int64_t start, int64_t len, const void *const *models,
                                   const int *dtypes, const void *base, int base_dtype, const float *weights,
                                   const float *thresholds, int sign_by_count, float tie_sign,
                                   float trimmed[][TILE], float *elected, float *base_scratch,
                                   float *model_scratch) {
    const float *b = input_tile(base, base_dtype, start, len, base_scratch);
    for (int64_t i = 0; i < n; i++)
        trimmed_tile(len, input_tile(models[i], dtypes[i], start, len, model_scratch), b, weights[i], thresholds[i],
                     trimmed[i]);
    elect_tile(n, len, trimmed, sign_by_count, tie_sign, elected);
    return b;
}

/* θ = θ_0 + λ · disjoint_merge(trim(τ_i), γ) over `count` positions, written to `out` (out_dtype). Returns 0,
 * or -1 when n exceeds MAX_MODELS (the caller then uses the torch path). */
int nbm_ties_merge(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                   int base_dtype, const float *weights, const float *thresholds, int sign_by_count, float tie_sign,
                   int merge_func, float scaling, void *out, int out_dtype) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float trimmed[MAX_MODELS][TILE];
    float elected[TILE], combined[TILE], divisor[TILE], base_scratch[TILE], model_scratch[TILE];
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        const float *b = trim_and_elect(n, start, len, models, dtypes, base, base_dtype, weights, thresholds,
                                        sign_by_count, tie_sign, trimmed, elected, base_scratch, model_scratch);
        merged_tile(n, len, trimmed, elected, b, weights, merge_func, scaling, combined, divisor);
        store_tile(out, out_dtype, start, len, combined);
    }
    return 0;
}

/* Σ over positions of the elected sign with exact ties counted 0 (the model-wide majority sign's balance). */
int nbm_ties_sign_balance(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                          int base_dtype, const float *weights, const float *thresholds, int sign_by_count,
                          int64_t *balance) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float trimmed[MAX_MODELS][TILE];
    float elected[TILE], base_scratch[TILE], model_scratch[TILE];
    int64_t total = 0;
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        trim_and_elect(n, start, len, models, dtypes, base, base_dtype, weights, thresholds, sign_by_count, 0.0f,
                       trimmed, elected, base_scratch, model_scratch);
        float tile_sum = 0.0f; /* at most TILE in magnitude: exact in float32 */
        for (int64_t j = 0; j < len; j++) tile_sum += elected[j];
        total += (int64_t)tile_sum;
    }
    *balance += total;
    return 0;
}

/* The counting pass of the threshold selection. Per task vector i, over m = |τ_i|:
 *   above[i] += #{m > high[i]};  the m with low[i] <= m <= high[i] are appended to bands[i] (band_lengths[i]
 *   counts them all; only the first band_capacity are stored, so a length above it means "overflowed");
 * and *changed += #{positions where some m != 0}. */
VECTOR_CLONES
static void magnitudes_tile(int64_t len, const float *model, const float *base, float weight, float high,
                            float *magnitude, float *any_changed, int64_t *above) {
    int32_t over = 0;
    for (int64_t j = 0; j < len; j++) {
        float m = fabsf((model[j] - base[j]) * weight);
        magnitude[j] = m;
        any_changed[j] += m;
        over += m > high;
    }
    *above += over;
}

/* inside[j] = low <= m[j] <= high, zero-padded to a multiple of 8. */
VECTOR_CLONES
static void band_flags(int64_t len, const float *magnitude, float low, float high, uint8_t *inside) {
    for (int64_t j = 0; j < len; j++) inside[j] = (magnitude[j] >= low) & (magnitude[j] <= high);
    for (int64_t j = len; j % 8; j++) inside[j] = 0;
}

/* Appends the tile's m inside [low, high] to band, in position order, returning the new length; past the
 * capacity only the count grows. `inside` (TILE + 8 flags) is left holding which positions were inside. */
static int64_t append_band(int64_t len, const float *magnitude, float low, float high, float *band,
                           int64_t stored, int64_t capacity, uint8_t *inside) {
    band_flags(len, magnitude, low, high, inside);
    const int room = stored + len <= capacity; /* room for the whole tile: compact without a branch per entry */
    for (int64_t j = 0; j < len; j += 8) {
        uint64_t group;
        memcpy(&group, inside + j, sizeof group);
        if (!group) continue; /* most groups of 8: the band holds a few percent of the entries */
        const int64_t end = j + 8 < len ? j + 8 : len;
        if (room) {
            for (int64_t k = j; k < end; k++) {
                band[stored] = magnitude[k];
                stored += inside[k];
            }
            continue;
        }
        for (int64_t k = j; k < end; k++)
            if (inside[k]) {
                if (stored < capacity) band[stored] = magnitude[k];
                stored++;
            }
    }
    return stored;
}

/* The indices of the set flags among flags[0, len) (zero-padded to a multiple of 8), in order; their count. */
static int64_t set_flags(int64_t len, const uint8_t *flags, int64_t *indices) {
    int64_t found = 0;
    for (int64_t j = 0; j < len; j += 8) {
        uint64_t group;
        memcpy(&group, flags + j, sizeof group);
        if (!group) continue;
        for (int64_t k = j; k < j + 8; k++) {
            indices[found] = k;
            found += flags[k];
        }
    }
    return found;
}

int nbm_ties_band(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                  int base_dtype, const float *weights, const float *lows, const float *highs, int64_t *above,
                      float *const *bands, int64_t *band_lengths, int64_t band_capacity, int64_t *changed) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float magnitude[TILE], any_changed[TILE], base_scratch[TILE], model_scratch[TILE];
    uint8_t inside[TILE + 8];
    int64_t changed_total = 0;
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        memset(any_changed, 0, sizeof(float) * (size_t)len);
        const float *b = input_tile(base, base_dtype, start, len, base_scratch);
        for (int64_t i = 0; i < n; i++) {
            magnitudes_tile(len, input_tile(models[i], dtypes[i], start, len, model_scratch), b, weights[i],
                            highs[i], magnitude, any_changed, &above[i]);
            band_lengths[i] = append_band(len, magnitude, lows[i], highs[i], bands[i], band_lengths[i],
                                          band_capacity, inside);
        }
        for (int64_t j = 0; j < len; j++) changed_total += any_changed[j] != 0.0f;
    }
    *changed += changed_total;
    return 0;
}

/* The sample that brackets the threshold: |τ_i| at runs of `run` consecutive positions starting every `stride`
 * positions (positions below `count`), computed as the counting pass computes it ((x_i − b) · w_i in float32,
 * then |·|), into magnitudes[i * samples + j] for the j-th sampled position. A run of a cache line's worth of
 * positions costs about what one position does: far fewer lines and pages touched than by single positions. */
static inline float stored_value(const void *tensor, int dtype, int64_t position) {
    if (dtype == DTYPE_F32) return ((const float *)tensor)[position];
    uint32_t widened = (uint32_t)((const uint16_t *)tensor)[position] << 16;
    float value;
    memcpy(&value, &widened, sizeof value);
    return value;
}

int nbm_ties_sample(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                    int base_dtype, const float *weights, int64_t stride, int64_t run, int64_t samples,
                    float *magnitudes) {
    if (n < 1 || n > MAX_MODELS || stride < 1 || run < 1 || run > stride) return -1;
    int64_t j = 0;
    for (int64_t first = 0; first < count && j < samples; first += stride)
        for (int64_t position = first; position < first + run && position < count && j < samples; position++, j++) {
            const float b = stored_value(base, base_dtype, position);
            for (int64_t i = 0; i < n; i++)
                magnitudes[i * samples + j] = fabsf((stored_value(models[i], dtypes[i], position) - b) * weights[i]);
        }
    return j == samples ? 0 : -2;
}

/* ---- TIES per tensor in one pass ---------------------------------------------------------------------------
 * The counting pass above and the merge, fused. With a bracket [low_i, high_i] known to hold the threshold t_i,
 * an entry with m_i > high_i is kept and one with m_i < low_i dropped whatever t_i is, so every position where
 * no model's m_i lies inside its bracket is merged now, trimming at low_i (what the exact t_i would keep). The
 * other positions (a few percent) are deferred: their stored values (x_0 … x_{n-1}, b) are gathered so that
 * nbm_ties_fixup merges them once the band gives t_i. Counts, bands and results are what nbm_ties_band and
 * nbm_ties_merge give, bit for bit. Deferred positions past `deferred_capacity` are only counted. */
int nbm_ties_bracketed(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                       int base_dtype, const float *weights, const float *lows, const float *highs,
                       int sign_by_count, float tie_sign, int merge_func, float scaling, void *out, int out_dtype,
                       int64_t *above, float *const *bands, int64_t *band_lengths, int64_t band_capacity,
                       int64_t *changed, int64_t *deferred_positions, float *deferred_values,
                       int64_t *deferred_length, int64_t deferred_capacity) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float trimmed[MAX_MODELS][TILE];
    float magnitude[TILE], any_changed[TILE], elected[TILE], combined[TILE], divisor[TILE];
    float base_scratch[TILE], model_scratch[TILE];
    uint8_t inside[TILE + 8], deferred[TILE + 8];
    int64_t tile_deferred[TILE + 8];
    int64_t changed_total = 0, stored = *deferred_length;
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        const int64_t before_tile = stored;
        memset(any_changed, 0, sizeof(float) * (size_t)len);
        memset(deferred, 0, sizeof deferred);
        const float *b = input_tile(base, base_dtype, start, len, base_scratch);
        for (int64_t i = 0; i < n; i++) {
            const float *x = input_tile(models[i], dtypes[i], start, len, model_scratch);
            magnitudes_tile(len, x, b, weights[i], highs[i], magnitude, any_changed, &above[i]);
            band_lengths[i] = append_band(len, magnitude, lows[i], highs[i], bands[i], band_lengths[i],
                                          band_capacity, inside);
            for (int64_t j = 0; j < len; j++) deferred[j] |= inside[j];
            trimmed_tile(len, x, b, weights[i], lows[i], trimmed[i]);
        }
        for (int64_t j = 0; j < len; j++) changed_total += any_changed[j] != 0.0f;
        elect_tile(n, len, trimmed, sign_by_count, tie_sign, elected);
        merged_tile(n, len, trimmed, elected, b, weights, merge_func, scaling, combined, divisor);
        store_tile(out, out_dtype, start, len, combined);
        const int64_t undecided = set_flags(len, deferred, tile_deferred);
        for (int64_t d = 0; d < undecided && stored < deferred_capacity; d++, stored++) {
            const int64_t k = tile_deferred[d];
            float *values = deferred_values + stored * (n + 1);
            for (int64_t i = 0; i < n; i++) values[i] = stored_value(models[i], dtypes[i], start + k);
            values[n] = b[k];
            deferred_positions[stored] = start + k;
        }
        stored = before_tile + undecided; /* past the capacity they are only counted */
    }
    *changed += changed_total;
    *deferred_length = stored;
    return 0;
}

/* θ at the deferred positions, from their gathered values and the exact thresholds, written into `out` (the
 * same arithmetic as nbm_ties_merge, a tile of gathered positions at a time). */
int nbm_ties_fixup(int64_t n, int64_t count, const int64_t *positions, const float *values, const float *weights,
                   const float *thresholds, int sign_by_count, float tie_sign, int merge_func, float scaling,
                   void *out, int out_dtype) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float trimmed[MAX_MODELS][TILE];
    float gathered[TILE], b[TILE], elected[TILE], combined[TILE], divisor[TILE];
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        const float *rows = values + start * (n + 1);
        for (int64_t j = 0; j < len; j++) b[j] = rows[j * (n + 1) + n];
        for (int64_t i = 0; i < n; i++) {
            for (int64_t j = 0; j < len; j++) gathered[j] = rows[j * (n + 1) + i];
            trimmed_tile(len, gathered, b, weights[i], thresholds[i], trimmed[i]);
        }
        elect_tile(n, len, trimmed, sign_by_count, tie_sign, elected);
        merged_tile(n, len, trimmed, elected, b, weights, merge_func, scaling, combined, divisor);
        for (int64_t j = 0; j < len; j++) store_tile(out, out_dtype, positions[start + j], 1, combined + j);
    }
    return 0;
}

/* ---- Order statistics -------------------------------------------------------------------------------------
 * The rank-th largest (1-based, from the top) of `count` non-negative float32 values, NaN counting as the
 * largest: radix selection on the bit patterns, which order as such values do (NaN above +inf). A histogram of
 * the top 16 bits finds the bucket that holds the rank, a histogram of the low 16 bits among the values in that
 * bucket the value itself: two passes and no comparisons, so a band of many equal values (magnitudes of bfloat16
 * differences) costs no more than any other. `histogram` is the caller's scratch of 65536 int64. Returns -1 when
 * rank is not in [1, count]. */
static uint32_t bit_pattern(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* The bucket, from the top, at which the running count reaches *rank; *rank becomes the rank inside it. */
static uint32_t bucket_of_rank(const int64_t *histogram, int64_t *rank) {
    int64_t above = 0;
    uint32_t bucket = 65535;
    while (above + histogram[bucket] < *rank) above += histogram[bucket--];
    *rank -= above;
    return bucket;
}

int nbm_kth_largest(int64_t count, const float *values, int64_t rank, int64_t *histogram, float *out) {
    if (rank < 1 || rank > count) return -1;
    memset(histogram, 0, 65536 * sizeof *histogram);
    for (int64_t j = 0; j < count; j++) histogram[bit_pattern(values[j]) >> 16]++;
    const uint32_t top = bucket_of_rank(histogram, &rank);
    memset(histogram, 0, 65536 * sizeof *histogram);
    for (int64_t j = 0; j < count; j++) {
        const uint32_t bits = bit_pattern(values[j]);
        histogram[bits & 0xFFFFu] += (bits >> 16) == top;
    }
    const uint32_t bits = top << 16 | bucket_of_rank(histogram, &rank);
    memcpy(out, &bits, sizeof *out);
    return 0;
}

/* ---- DARE ---------------------------------------------------------------------------------------------------
 * Counter-based draws: the uniform draw of model i at flat position j of a tensor is a pure function of
 * (key_i, j) (SplitMix64's finaliser of key + (j + 1) · φ), so any range of positions is drawn on its own and
 * the same positions give the same draws whatever the split. u = top 24 bits · 2⁻²⁴ ∈ [0, 1); an entry is kept
 * when u >= p (keep_from = p rounded up to float32, so the float compare is exact). plugins/dare.py computes the
 * same draws in torch.
 * The loops carry the counter c = key + (j + 1) · φ along (c += φ per position, a vector induction) instead of
 * multiplying by φ per draw, and the finaliser's last step z ^= z >> 31 is left out: it changes only bits 0..32
 * of z (z >> 31 has bits 33..63 zero), never the top 24 bits a draw keeps. The draws stay SplitMix64's, bit for
 * bit, at a third fewer multiplies (on AVX2, which has no 64-bit multiply, each is seven instructions):
 * dare_ties 25% faster there. */
#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)

static inline uint64_t first_counter(uint64_t key, uint64_t position) { return key + (position + 1) * GOLDEN; }

static inline float draw_at(uint64_t counter) {
    uint64_t z = (counter ^ (counter >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return (float)(uint32_t)(z >> 40) * (1.0f / 16777216.0f);
}

/* The dropped and rescaled w_i τ_i of one tile: ((m ⊙ τ) / divisor · multiplier) · w, m = [u >= keep_from]. */
VECTOR_CLONES
static void sparse_tile(int64_t len, const float *model, const float *base, uint64_t key, uint64_t first,
                        float keep_from, float divisor, float multiplier, float weight, float *out) {
    uint64_t counter = first_counter(key, first);
    for (int64_t j = 0; j < len; j++, counter += GOLDEN) {
        float tau = model[j] - base[j];
        float kept = draw_at(counter) >= keep_from || tau != tau ? tau : 0.0f;
        out[j] = kept / divisor * multiplier * weight;
    }
}

/* One tile's Σ|x − b| and Σ over kept entries of |x − b|, added to *all and *kept; the tile's partial sums run
 * in L float lanes (position j in lane j mod L: an order the compiler can vectorise), the totals in double. */
#define L1_LANES 16
VECTOR_CLONES
static void l1_tile(int64_t len, const float *x, const float *b, uint64_t key, uint64_t first, float keep_from,
                    double *all, double *kept) {
    float all_lanes[L1_LANES] = {0}, kept_lanes[L1_LANES] = {0};
    uint64_t counters[L1_LANES];  /* lane k's counter, at position j + k */
    for (int k = 0; k < L1_LANES; k++) counters[k] = first_counter(key, first + (uint64_t)k);
    int64_t j = 0;
    for (; j + L1_LANES <= len; j += L1_LANES)
        for (int k = 0; k < L1_LANES; k++) {
            float magnitude = fabsf(x[j + k] - b[j + k]);
            all_lanes[k] += magnitude;
            kept_lanes[k] += draw_at(counters[k]) >= keep_from ? magnitude : 0.0f;
            counters[k] += L1_LANES * GOLDEN;
        }
    for (uint64_t counter = first_counter(key, first + (uint64_t)j); j < len; j++, counter += GOLDEN) {
        float magnitude = fabsf(x[j] - b[j]);
        all_lanes[0] += magnitude;
        kept_lanes[0] += draw_at(counter) >= keep_from ? magnitude : 0.0f;
    }
    double all_sum = 0.0, kept_sum = 0.0;
    for (int k = 0; k < L1_LANES; k++) all_sum += all_lanes[k], kept_sum += kept_lanes[k];
    *all += all_sum, *kept += kept_sum;
}

/* Per model: Σ|τ_i| and Σ|m_i ⊙ τ_i| (in double) over `count` positions from `first` (the L1 rescale). */
int nbm_dare_l1(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                int base_dtype, const uint64_t *keys, int64_t first, float keep_from, double *before,
                double *after) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float base_scratch[TILE], model_scratch[TILE];
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        const float *b = input_tile(base, base_dtype, start, len, base_scratch);
        for (int64_t i = 0; i < n; i++)
            l1_tile(len, input_tile(models[i], dtypes[i], start, len, model_scratch), b, keys[i],
                    (uint64_t)(first + start), keep_from, &before[i], &after[i]);
    }
    return 0;
}

/* θ_0 + λ · combine_i(w_i · m_i ⊙ τ_i, rescaled): combine 0 = Σ (dare_linear), 1 = Σ over the entries whose sign
 * agrees with sign(Σ), exact ties electing + (dare_ties, not normalised, as in mergekit). */
int nbm_dare_merge(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
                   int base_dtype, const float *weights, const uint64_t *keys, int64_t first, float keep_from,
                   const float *divisors, const float *multipliers, int combine, float scaling, void *out,
                   int out_dtype) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float sparse[MAX_MODELS][TILE];
    float elected[TILE], combined[TILE], divisor[TILE], base_scratch[TILE], model_scratch[TILE];
    static const float ones[MAX_MODELS] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        const float *b = input_tile(base, base_dtype, start, len, base_scratch);
        for (int64_t i = 0; i < n; i++)
            sparse_tile(len, input_tile(models[i], dtypes[i], start, len, model_scratch), b, keys[i],
                        (uint64_t)(first + start), keep_from, divisors[i], multipliers[i], weights[i], sparse[i]);
        if (combine == 1) {
            elect_tile(n, len, sparse, 0, 1.0f, elected);
            disjoint_tile(n, len, sparse, elected, ones, 1, combined, divisor);
        } else {
            for (int64_t j = 0; j < len; j++) combined[j] = 0.0f;
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < len; j++) combined[j] += sparse[i][j];
        }
        for (int64_t j = 0; j < len; j++) combined[j] = b[j] + combined[j] * scaling;
        store_tile(out, out_dtype, start, len, combined);
    }
    return 0;
}

/* total += c · (x − b), or total += c · x when base is NULL. */
VECTOR_CLONES
static void accumulate_difference(int64_t len, const float *model, const float *base, float weight, float *total) {
    if (base)
        for (int64_t j = 0; j < len; j++) total[j] += weight * (model[j] - base[j]);
    else
        for (int64_t j = 0; j < len; j++) total[j] += weight * model[j];
}

/* The same for a bfloat16 model read as stored: widened in the loop, not through a scratch tile. */
VECTOR_CLONES
static void accumulate_difference_bf16(int64_t len, const uint16_t *model, const float *base, float weight,
                                       float *total) {
    for (int64_t j = 0; j < len; j++) {
        uint32_t widened = (uint32_t)model[j] << 16;
        float value;
        memcpy(&value, &widened, sizeof value);
        total[j] += base ? weight * (value - base[j]) : weight * value;
    }
}

/* total += weight · (model − base) (or weight · model without a base) over one tile of model i, as stored. */
static void accumulate_model(int64_t len, const void *model, int dtype, int64_t start, const float *base,
                             float weight, float *total, float *scratch) {
    if (dtype == DTYPE_BF16)
        accumulate_difference_bf16(len, (const uint16_t *)model + start, base, weight, total);
    else
        accumulate_difference(len, input_tile(model, dtype, start, len, scratch), base, weight, total);
}

/* ---- linear combinations --------------------------------------------------------------------------------------
 * With a base: θ = b + Σ_i c_i (x_i − b), accumulated in the order of the models (task arithmetic, lerp); without
 * (base == NULL): θ = Σ_i c_i x_i (weighted average). `weights` are the coefficients c_i. */
int nbm_linear(int64_t n, int64_t count, const void *const *models, const int *dtypes, const void *base,
               int base_dtype, const float *weights, void *out, int out_dtype) {
    if (n < 1 || n > MAX_MODELS) return -1;
    float total[TILE], base_scratch[TILE], model_scratch[TILE];
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        const float *b = base ? input_tile(base, base_dtype, start, len, base_scratch) : NULL;
        if (b)
            memcpy(total, b, sizeof(float) * (size_t)len);
        else
            memset(total, 0, sizeof(float) * (size_t)len);
        for (int64_t i = 0; i < n; i++)
            accumulate_model(len, models[i], dtypes[i], start, b, weights[i], total, model_scratch);
        store_tile(out, out_dtype, start, len, total);
    }
    return 0;
}

/* ---- SLERP's reductions ---------------------------------------------------------------------------------------
 * sums[0] += Σ a², sums[1] += Σ b², sums[2] += Σ a·b over `count` positions, accumulated in double in 32 lanes
 * (a vertical sum the compiler vectorises; the lanes add up at the end). 32 lanes are four AVX-512 registers per
 * sum, so consecutive additions do not wait on each other's latency: 1.4-2x the speed of 8 lanes. */
#define LANES 32
VECTOR_CLONES
static void dot_norms_tile(int64_t len, const float *x, const float *y, double *aa, double *bb, double *ab) {
    int64_t j = 0;
    for (; j + LANES <= len; j += LANES)
        for (int k = 0; k < LANES; k++) {
            double a = x[j + k], b = y[j + k];
            aa[k] += a * a, bb[k] += b * b, ab[k] += a * b;
        }
    for (; j < len; j++) {
        double a = x[j], b = y[j];
        aa[0] += a * a, bb[0] += b * b, ab[0] += a * b;
    }
}

int nbm_dot_norms(int64_t count, const void *a, int a_dtype, const void *b, int b_dtype, double *sums) {
    float a_scratch[TILE], b_scratch[TILE];
    double aa[LANES] = {0}, bb[LANES] = {0}, ab[LANES] = {0};
    for (int64_t start = 0; start < count; start += TILE) {
        int64_t len = count - start < TILE ? count - start : TILE;
        dot_norms_tile(len, input_tile(a, a_dtype, start, len, a_scratch),
                       input_tile(b, b_dtype, start, len, b_scratch), aa, bb, ab);
    }
    for (int k = 0; k < LANES; k++) sums[0] += aa[k], sums[1] += bb[k], sums[2] += ab[k];
    return 0;
}
