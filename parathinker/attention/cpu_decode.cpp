// Decode attention over contexts read in place from the paged KV pool (CPU, float32): the two
// matmuls of `attention.long_decode` for every sequence of a step in one call each, built and
// loaded by `attention.native`. One query token per sequence; the G query heads of a KV head
// share each K/V row's read.
//
// MKL's sgemm for q [G, D] @ K^T [D, n] with G a few rows reads K at about half the read
// bandwidth (BENCHMARKS.md, "A decode kernel"); here each K row is read once, its G dot products
// reduced 16 keys at a time (a transpose-add of 16 vectors), and stored as one vector per row.
//
// Work is split into chunks of a sequence's context (at most CHUNK keys, a few pieces of its
// runs each) times KV heads, independent of the thread count, so the results do not depend on
// it: P @ V sums each chunk's part, then the chunks in order.
//
// Tables (int64, built once per step by long_decode._Buffers):
//   pieces [P, 2]: (first slot, length), a part of one run of the pool;
//   chunks [N, 4]: (sequence, first piece, end piece, first key of the chunk in its context);
//   seqs   [B, 4]: (context length C, offset of its [H, G, C] scores, first chunk, end chunk).

#include <cstdint>
#include <cstring>

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }

#ifdef __clang__
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t v16i __attribute__((vector_size(64)));
#define SHUF(a, b, ...) __builtin_shuffle(a, b, v16i{__VA_ARGS__})
#endif

// 16 vectors -> one vector whose lane i is the sum of the lanes of v[i].
static inline v16 reduce16(const v16* v) {
  v16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = SHUF(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = SHUF(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUF(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUF(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUF(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

struct Step {
  const int64_t* pieces;
  const int64_t* chunks;
  const int64_t* seqs;
  int64_t num_chunks;
  int H, G;
  int64_t head_stride;  // elements between KV heads of the pool; a slot is D elements
  int num_threads;
};

// scores[b][h, g, j] = q[b, h, g] . K[h, slot j of b's context]
template <int W>
static void scores_kernel(const Step& s, const float* q, const float* k, float* scores) {
  constexpr int D = 16 * W;
  const int H = s.H, G = s.G;
#pragma omp parallel for schedule(dynamic, 1) num_threads(s.num_threads)
  for (int64_t item = 0; item < s.num_chunks * H; ++item) {
    const int64_t* c = s.chunks + 4 * (item / H);
    const int h = (int)(item % H);
    const int64_t* sq = s.seqs + 4 * c[0];
    const int64_t C = sq[0];
    const float* qh = q + (c[0] * H + h) * G * D;
    float* o = scores + sq[1] + (int64_t)h * G * C;
    int64_t j = c[3];
    for (int64_t p = c[1]; p < c[2]; ++p) {
      const float* kr = k + h * s.head_stride + s.pieces[2 * p] * D;
      const int64_t m = s.pieces[2 * p + 1];
      for (int64_t t0 = 0; t0 < m; t0 += 16) {
        const int nk = m - t0 < 16 ? (int)(m - t0) : 16;
        for (int g = 0; g < G; ++g) {
          v16 qv[W], acc[16];
          for (int w = 0; w < W; ++w) qv[w] = load(qh + g * D + 16 * w);
          for (int i = 0; i < 16; ++i) {  // past the run's end: its first row again, not stored
            const float* kp = kr + (t0 + (i < nk ? i : 0)) * D;
            v16 a = qv[0] * load(kp);
            for (int w = 1; w < W; ++w) a += qv[w] * load(kp + 16 * w);
            acc[i] = a;
          }
          const v16 dots = reduce16(acc);
          float* dst = o + g * C + j + t0;
          if (nk == 16) std::memcpy(dst, &dots, 64);
          else for (int i = 0; i < nk; ++i) dst[i] = dots[i];
        }
      }
      j += m;
    }
  }
}

// out[b, h, g] = sum_j probs[b][h, g, j] V[h, slot j of b's context]; partial: [N, H, G, D]
template <int W, int G>
static void pv_kernel(const Step& s, const float* probs, const float* v, float* partial,
                      float* out, int64_t num_seqs) {
  constexpr int D = 16 * W;
  constexpr int WC = W < 4 ? W : (G * 4 <= 24 ? 4 : 2);  // accumulators: G x WC vectors
  const int H = s.H;
#pragma omp parallel num_threads(s.num_threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < s.num_chunks * H; ++item) {
      const int64_t* c = s.chunks + 4 * (item / H);
      const int h = (int)(item % H);
      const int64_t* sq = s.seqs + 4 * c[0];
      const int64_t C = sq[0];
      const float* ph = probs + sq[1] + (int64_t)h * G * C;
      float* dst = partial + item * G * D;
      for (int w0 = 0; w0 < W; w0 += WC) {
        v16 acc[G][WC] = {};
        int64_t j = c[3];
        for (int64_t p = c[1]; p < c[2]; ++p) {
          const float* vr = v + h * s.head_stride + s.pieces[2 * p] * D + 16 * w0;
          const int64_t m = s.pieces[2 * p + 1];
          for (int64_t t = 0; t < m; ++t, ++j) {
            v16 row[WC];
            for (int w = 0; w < WC; ++w) row[w] = load(vr + t * D + 16 * w);
            for (int g = 0; g < G; ++g) {
              const float pg = ph[g * C + j];
              for (int w = 0; w < WC; ++w) acc[g][w] += pg * row[w];
            }
          }
        }
        for (int g = 0; g < G; ++g)
          for (int w = 0; w < WC; ++w) std::memcpy(dst + g * D + 16 * (w0 + w), &acc[g][w], 64);
      }
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < num_seqs * H; ++bh) {
      const int64_t* sq = s.seqs + 4 * (bh / H);
      const int h = (int)(bh % H);
      float* o = out + bh * G * D;
      std::memcpy(o, partial + (sq[2] * H + h) * G * D, sizeof(float) * G * D);
      for (int64_t c = sq[2] + 1; c < sq[3]; ++c) {
        const float* part = partial + (c * H + h) * G * D;
        for (int i = 0; i < G * D; ++i) o[i] += part[i];
      }
    }
  }
}

template <int W>
static int pv_dispatch(const Step& s, const float* probs, const float* v, float* partial,
                       float* out, int64_t num_seqs) {
  switch (s.G) {
    case 1: pv_kernel<W, 1>(s, probs, v, partial, out, num_seqs); return 0;
    case 2: pv_kernel<W, 2>(s, probs, v, partial, out, num_seqs); return 0;
    case 3: pv_kernel<W, 3>(s, probs, v, partial, out, num_seqs); return 0;
    case 4: pv_kernel<W, 4>(s, probs, v, partial, out, num_seqs); return 0;
    case 5: pv_kernel<W, 5>(s, probs, v, partial, out, num_seqs); return 0;
    case 6: pv_kernel<W, 6>(s, probs, v, partial, out, num_seqs); return 0;
    case 7: pv_kernel<W, 7>(s, probs, v, partial, out, num_seqs); return 0;
    case 8: pv_kernel<W, 8>(s, probs, v, partial, out, num_seqs); return 0;
  }
  return 1;
}

extern "C" {

// Both return 0, or 1 for a shape they do not serve (head_dim not 16/32/64/128, G over 8).
int decode_scores(const float* q, const float* k, float* scores, const int64_t* pieces,
                  const int64_t* chunks, int64_t num_chunks, const int64_t* seqs, int H, int G,
                  int D, int64_t head_stride, int num_threads) {
  const Step s{pieces, chunks, seqs, num_chunks, H, G, head_stride, num_threads};
  if (G < 1 || G > 8) return 1;
  switch (D) {
    case 16: scores_kernel<1>(s, q, k, scores); return 0;
    case 32: scores_kernel<2>(s, q, k, scores); return 0;
    case 64: scores_kernel<4>(s, q, k, scores); return 0;
    case 128: scores_kernel<8>(s, q, k, scores); return 0;
  }
  return 1;
}

int decode_pv(const float* probs, const float* v, float* partial, float* out,
              const int64_t* pieces, const int64_t* chunks, int64_t num_chunks,
              const int64_t* seqs, int64_t num_seqs, int H, int G, int D, int64_t head_stride,
              int num_threads) {
  const Step s{pieces, chunks, seqs, num_chunks, H, G, head_stride, num_threads};
  switch (D) {
    case 16: return pv_dispatch<1>(s, probs, v, partial, out, num_seqs);
    case 32: return pv_dispatch<2>(s, probs, v, partial, out, num_seqs);
    case 64: return pv_dispatch<4>(s, probs, v, partial, out, num_seqs);
    case 128: return pv_dispatch<8>(s, probs, v, partial, out, num_seqs);
  }
  return 1;
}

}  // extern "C"
