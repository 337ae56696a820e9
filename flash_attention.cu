// =============================================================================
// flash_attention.cu: FP32 FlashAttention for head_dim 64, forward and backward.
//
// What it implements
//   FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691), which refines
//   FlashAttention (Dao et al., 2022, https://arxiv.org/abs/2205.14135). Its Algorithm 1 is
//   the forward and its Algorithm 2 the backward; "Alg. 1 line 8" cites line 8 of the first.
//   Forward:  one thread block per query tile Q_i walks the key/value tiles K_j, V_j with
//             the online softmax, and saves the logsumexp L_i for the backward.
//   Backward: one thread block per key/value tile walks the query tiles, builds dK_j and
//             dV_j in registers (no atomics) and adds its share of each dQ_i.
//
// A book in parts: read them in order, and stop after any of them.
//   Part I   The algorithm (kernel="tutorial"): 16 x 16 tiles and plain FP32 FMAs; every
//            block of code names the line of Algorithm 1 or 2 it implements. Complete on
//            its own: forward, the D preprocess, backward in both modes, the dQ sum.
//   Part II  Tensor cores (kernel="fast", the default before Hopper): the same algorithm
//            and loop order on 64 x 64 tiles, with mma.sync in FP32 accuracy (3xTF32); it
//            reuses Part I's D preprocess and dQ sum.
//   Part III Hopper (kernel="hopper", the default on H100 and H200, built for sm_90a): the
//            forward on warpgroup MMA, fed by a producer warpgroup through mbarriers; Part
//            II's backward.
//   Then     the dispatch between the parts, and the PyTorch binding.
//
// Determinism
//   The forward is deterministic: a block walks its key tiles in order. The default
//   backward adds the shares of dQ_i with atomicAdd, so the order of the additions, and
//   the last bits of dQ, change from run to run. The deterministic backward adds the
//   shares of key tile j into partial buffer j mod P, in the order of j, and a last
//   kernel adds buffers 1, 2, ..., P - 1 to buffer 0 (dQ itself), in that order. P
//   depends only on Nk, causal and the part, so the result depends neither on B, H nor
//   on the GPU. Each part says how it keeps the order within a buffer.
//
// Build and test
//   ./install.sh && ./test_installation.sh     (the Python extension, then every test)
//   nvcc -gencode arch=compute_90a,code=sm_90a -DFLASH_ATTENTION_SM90A -Xptxas -v -c flash_attention.cu -o /dev/null
//                                               (the kernels alone, without PyTorch; sm_90a holds Part III)
//   The PyTorch binding at the end of this file is compiled only when
//   FLASH_ATTENTION_WITH_TORCH is defined (setup.py and flash_attention.py define it).
// =============================================================================

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>

// =============================================================================
// Part I. The algorithm: 16 x 16 tiles (kernel="tutorial")
// =============================================================================
// A tile is 16 rows of 64 floats; a block of 256 threads gives each tile row to 16
// threads (a half-warp), each owning 4 of its columns. Every product is a loop of FP32
// FMAs over shared memory. USAGE.md sections 1-4 walk through the same lines.

namespace flash {

constexpr int d = 64;  // head dimension, in every part

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// Key `col` is hidden from query `row` past the end of the keys, and above the diagonal
// when causal (top-left aligned, as scaled_dot_product_attention(is_causal=True)).
// The kernels skip the products of a pair above the diagonal rather than multiply by its zero
// probability: 0 * NaN is NaN, and a NaN in a hidden key (or query) must not reach the
// queries (or keys) it is hidden from. Rows past Nq or Nk need no such care: their tiles
// are filled with zeros.
__device__ __forceinline__ bool above_diagonal(int row, int col, bool causal) {
    return causal && col > row;
}
__device__ __forceinline__ bool masked(int row, int col, int Nk, bool causal) {
    return col >= Nk || above_diagonal(row, col, causal);
}

// The rows of one head's (N, d) matrix: row n starts at start + n * stride, and its d
// floats are contiguous.
template <typename T>
struct Rows {
    T* start;
    int stride;
    __device__ __forceinline__ T* operator[](int n) const { return start + (int64_t)n * stride; }
};

// A (B, H, N, d) tensor as the kernels read it: row n of head bh = b * H + h starts at
// data + b * batch_stride + h * head_stride + n * row_stride. A contiguous tensor has the
// strides (H N d, N d, d); a slice of a packed qkv tensor, a (B, N, H, d) layout and a
// broadcast dimension (stride 0) are read where they are, without a copy.
template <typename T>
struct Tensor4 {
    T* data;
    int64_t batch_stride, head_stride;
    int row_stride, H;
    __device__ __forceinline__ Rows<T> head(int64_t bh) const {
        const int b = (int)bh / H, h = (int)bh % H;  // bh < 2^31: the grids are smaller
        return {data + b * batch_stride + h * head_stride, row_stride};
    }
};
using In = Tensor4<const float>;  // the launchers' names for inputs and outputs
using Out = Tensor4<float>;

// Where a backward block writes its dQ shares for head bh: partial buffer p of the
// deterministic mode. Buffer 0 is dQ itself, which is also where the default mode adds;
// buffers 1 .. P-1 lie in dQ_partial, each B * H * Nq * d floats laid out as dQ.
__device__ __forceinline__ Rows<float> dq_buffer(Tensor4<float> dQ, float* dQ_partial, int p, int64_t bh,
                                                 int64_t BH, int Nq) {
    if (p > 0) dQ.data = dQ_partial + (p - 1) * BH * Nq * d;
    return dQ.head(bh);
}

namespace tutorial {

constexpr int Br = 16;            // query rows in a tile (Q_i, O_i, dQ_i, L_i, D_i)
constexpr int Bc = 16;            // key/value rows in a tile (K_j, V_j, dK_j, dV_j)
constexpr int THREADS = 256;      // one thread per (tile row, group of 4 columns)
constexpr int LANES_PER_ROW = 16; // the 16 lanes of a half-warp share one tile row
constexpr int STRIDE = d + 4;     // padded row: float4 reads of 16 different rows hit 32 banks
constexpr int DQ_PARTIALS = 16;   // most dQ partial buffers in the deterministic backward

static_assert(d == 4 * LANES_PER_ROW, "each of a row's 16 threads owns 4 consecutive columns");
static_assert(Br * LANES_PER_ROW == THREADS && Bc * LANES_PER_ROW == THREADS,
              "a tile of 16 rows x 64 columns is one float4 per thread");
static_assert(Bc == LANES_PER_ROW, "thread (row r, lane c) computes the score S[r][c]");
static_assert(STRIDE % 4 == 0, "rows of a shared tile must stay 16-byte aligned");

// Thread t works on tile row t / 16 and on lane t % 16 of that row: the score S[row][lane]
// and the four columns 4 * lane .. 4 * lane + 3 of the row's output.
__device__ __forceinline__ int tile_row() { return threadIdx.x / LANES_PER_ROW; }
__device__ __forceinline__ int tile_lane() { return threadIdx.x % LANES_PER_ROW; }

// Copy rows row0 .. row0 + 15 of an (N, d) matrix into a shared tile.
// Rows past the end of the matrix (the last, partial tile) are filled with zeros.
__device__ __forceinline__ void load_tile(float (*tile)[STRIDE], Rows<const float> src,
                                          int row0, int N) {
    const int r = tile_row(), c = 4 * tile_lane();
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < N) x = *reinterpret_cast<const float4*>(src[row0 + r] + c);
    *reinterpret_cast<float4*>(&tile[r][c]) = x;
}

// Dot product of two 64-float rows of shared tiles, in a fixed order.
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < d; c += 4) {
        const float4 x = *reinterpret_cast<const float4*>(a + c);
        const float4 y = *reinterpret_cast<const float4*>(b + c);
        s = fmaf(x.x, y.x, s);
        s = fmaf(x.y, y.y, s);
        s = fmaf(x.z, y.z, s);
        s = fmaf(x.w, y.w, s);
    }
    return s;
}

// Max and sum over the 16 lanes that hold one tile row (a butterfly: every lane gets the result).
__device__ __forceinline__ float row_max(float x) {
#pragma unroll
    for (int offset = LANES_PER_ROW / 2; offset > 0; offset /= 2)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset, LANES_PER_ROW));
    return x;
}
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int offset = LANES_PER_ROW / 2; offset > 0; offset /= 2)
        x += __shfl_xor_sync(0xffffffffu, x, offset, LANES_PER_ROW);
    return x;
}

// acc += a * x, on four columns
__device__ __forceinline__ void fma4(float4& acc, float a, const float4& x) {
    acc.x = fmaf(a, x.x, acc.x);
    acc.y = fmaf(a, x.y, acc.y);
    acc.z = fmaf(a, x.z, acc.z);
    acc.w = fmaf(a, x.w, acc.w);
}

// -----------------------------------------------------------------------------
// Forward: Algorithm 1 (FlashAttention-2 loop order)
// -----------------------------------------------------------------------------
// One block per (batch * head, query tile i); grid = B * H * Tr blocks.
//   Alg. 1 lines 1-2 (split Q, O, L into Tr tiles, K and V into Tc tiles): the indexing below.
//   line 3  (for 1 <= i <= Tr)          : the grid: one block per query tile
//   line 4  (load Q_i)                  : load_tile(Q_i, ...) before the loop
//   line 5  (O_i = 0, l_i = 0, m_i = -inf): acc, l_i, m_i in registers
//   line 6  (for 1 <= j <= Tc)          : the j loop; causal stops at the last tile on or
//                                         below the diagonal
//   line 7  (load K_j, V_j)             : load_tile(K_j / V_j, ...)
//   line 8  (S_ij = Q_i K_j^T)          : dot_row, times softmax_scale; thread (r, c)
//                                         computes S_ij[r][c]
//   line 9  (m_i, P~_ij, l_i)           : row_max, expf, row_sum over the row's 16 lanes;
//                                         alpha = exp(m_i old - m_i new) rescales l_i
//   line 10 (O_i = alpha O_i + P~_ij V_j): acc; P~[r][k] comes from lane k by a shuffle
//   lines 12-15 (O_i /= l_i, L_i = m_i + log(l_i), write O_i, L_i): after the loop; L_i
//                                         is the logsumexp the backward uses.
__global__ void __launch_bounds__(THREADS)
forward_kernel(Tensor4<const float> q,     // (B, H, Nq, d)
               Tensor4<const float> k,     // (B, H, Nk, d)
               Tensor4<const float> v,     // (B, H, Nk, d)
               Tensor4<float> o,           // (B, H, Nq, d)
               float* __restrict__ L,      // (B, H, Nq), contiguous
               int Nq, int Nk, float softmax_scale, bool causal) {
    __shared__ __align__(16) float Q_i[Br][STRIDE];
    __shared__ __align__(16) float K_j[Bc][STRIDE];
    __shared__ __align__(16) float V_j[Bc][STRIDE];

    const int Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    const int i = blockIdx.x % Tr;          // query tile
    const int64_t bh = blockIdx.x / Tr;     // batch * H + head
    const Rows<const float> Q = q.head(bh), K = k.head(bh), V = v.head(bh);  // this head's matrices
    const Rows<float> O = o.head(bh);
    L += bh * Nq;

    const int r = tile_row(), c = tile_lane();
    const int row = i * Br + r;             // the query row of this thread

    load_tile(Q_i, Q, i * Br, Nq);          // Alg. 1 line 4

    float m_i = -INFINITY;                  // running row max     (line 5: m_i = -inf)
    float l_i = 0.f;                        // running row sum     (line 5: l_i = 0)
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);  // O_i[r][4c .. 4c+3], unnormalized (line 5: 0)

    const int last_row = min((i + 1) * Br, Nq) - 1;
    const int Tc_end = causal ? min(Tc, last_row / Bc + 1) : Tc;
    for (int j = 0; j < Tc_end; ++j) {      // Alg. 1 line 6
        load_tile(K_j, K, j * Bc, Nk);      // line 7
        load_tile(V_j, V, j * Bc, Nk);
        __syncthreads();                    // Q_i, K_j, V_j are in shared memory

        // line 8: S_ij[r][c] = scale * Q_i[r] . K_j[c]; hidden keys get -inf
        const int col = j * Bc + c;
        float s = softmax_scale * dot_row(Q_i[r], K_j[c]);
        if (masked(row, col, Nk, causal)) s = -INFINITY;

        // line 9: the online softmax. Tile 0 always holds key 0, which no row hides,
        // so m_new is finite from the first tile on and exp(-inf - m_new) = 0.
        const float m_new = fmaxf(m_i, row_max(s));
        const float p = expf(s - m_new);             // P~_ij[r][c]
        const float alpha = expf(m_i - m_new);       // rescales what was accumulated so far
        l_i = alpha * l_i + row_sum(p);

        // line 10: O_i = alpha * O_i + P~_ij V_j
        acc.x *= alpha; acc.y *= alpha; acc.z *= alpha; acc.w *= alpha;
#pragma unroll
        for (int k = 0; k < Bc; ++k) {
            const float p_k = __shfl_sync(0xffffffffu, p, k, LANES_PER_ROW);  // P~_ij[r][k]
            if (!above_diagonal(row, j * Bc + k, causal))
                fma4(acc, p_k, *reinterpret_cast<const float4*>(&V_j[k][4 * c]));
        }
        m_i = m_new;
        __syncthreads();                    // every thread is done with K_j, V_j before the next load
    }

    // lines 12-15: O_i / l_i and L_i = m_i + log(l_i), written for the rows that exist
    if (row < Nq) {
        const float inv_l = 1.f / l_i;
        *reinterpret_cast<float4*>(O[row] + 4 * c) =
            make_float4(acc.x * inv_l, acc.y * inv_l, acc.z * inv_l, acc.w * inv_l);
        if (c == 0) L[row] = m_i + logf(l_i);
    }
}

// -----------------------------------------------------------------------------
// Backward preprocess: D = rowsum(dO * O) (Alg. 2 line 4), and dQ = 0 (line 3)
// -----------------------------------------------------------------------------
// One block per (batch * head, query tile); each half-warp reduces one row. In the default
// mode, where the backward adds into dQ, the same threads zero it (dq.data is null in the
// deterministic mode, where the first writer of each buffer stores). They also zero the
// `count` ints at `counters` (count may be 0; this part's backward has none), which a
// backward that orders its deterministic writers by counters needs zeroed: one launch less
// than a memset.
__global__ void __launch_bounds__(THREADS)
preprocess_kernel(Tensor4<const float> dout,  // (B, H, Nq, d)
                  Tensor4<const float> o,     // (B, H, Nq, d)
                  float* __restrict__ D,      // (B, H, Nq), contiguous
                  Tensor4<float> dq,          // (B, H, Nq, d), or data null
                  int* __restrict__ counters, int64_t count, int Nq) {
    for (int64_t n = (int64_t)blockIdx.x * THREADS + threadIdx.x; n < count; n += (int64_t)gridDim.x * THREADS)
        counters[n] = 0;
    if (Nq == 0) return;

    const int Tr = cdiv(Nq, Br);
    const int i = blockIdx.x % Tr;
    const int64_t bh = blockIdx.x / Tr;
    const int r = tile_row(), c = tile_lane();
    const int row = i * Br + r;

    float partial = 0.f;
    if (row < Nq) {
        const float4 x = *reinterpret_cast<const float4*>(dout.head(bh)[row] + 4 * c);
        const float4 y = *reinterpret_cast<const float4*>(o.head(bh)[row] + 4 * c);
        partial = x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
        if (dq.data) *reinterpret_cast<float4*>(dq.head(bh)[row] + 4 * c) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    const float sum = row_sum(partial);     // every lane takes part in the shuffle
    if (row < Nq && c == 0) D[bh * Nq + row] = sum;
}

// -----------------------------------------------------------------------------
// Backward: Algorithm 2 (FlashAttention-2 loop order)
// -----------------------------------------------------------------------------
// grid = B * H * slots blocks. Block `slot` of a head handles key tiles j = slot,
// slot + slots, ...: slots = Tc by default (one key tile per block), and
// slots = P = min(Tc, DQ_PARTIALS) in the deterministic mode.
//   Alg. 2 lines 1-3 (split into tiles; dQ = 0)   : the indexing; dQ zeroed by preprocess_kernel
//   line 4  (D = rowsum(dO * O))              : preprocess_kernel, before this kernel
//   line 5  (for 1 <= j <= Tc)                : the j loop; load K_j, V_j (line 6)
//   line 7  (dK_j = 0, dV_j = 0)              : dK_acc, dV_acc in registers
//   line 8  (for 1 <= i <= Tr)                : the i loop; causal starts at the first
//                                               query tile that sees key tile j
//   line 9  (load Q_i, dO_i, L_i, D_i)        : O_i is not needed: D_i holds what it gave
//   line 10 (S_ij = Q_i K_j^T)                : times softmax_scale; thread (r, c)
//                                               computes S_ij[r][c]
//   line 11 (P_ij = exp(S_ij - L_i))          : P recomputed from the saved logsumexp
//   line 12 (dV_j += P_ij^T dO_i)             : dV_acc
//   line 13 (dP_ij = dO_i V_j^T)              : dp
//   line 14 (dS_ij = P_ij * (dP_ij - D_i))    : dS
//   line 15 (dQ_i += dS_ij K_j)               : times softmax_scale; atomicAdd, or the
//                                               block's partial buffer
//   line 16 (dK_j += dS_ij^T Q_i)             : dK_acc (times softmax_scale once, at the end)
//   line 18 (write dK_j, dV_j)                : after the i loop
// Thread (r, c) owns, besides S_ij[r][c], the columns 4c .. 4c+3 of row r of dK_j and dV_j
// (key j * Bc + r) and of row r of dQ_i (query i * Br + r).
__global__ void __launch_bounds__(THREADS)
backward_kernel(Tensor4<const float> q,        // (B, H, Nq, d)
                Tensor4<const float> k,        // (B, H, Nk, d)
                Tensor4<const float> v,        // (B, H, Nk, d)
                Tensor4<const float> dout,     // (B, H, Nq, d)
                const float* __restrict__ L,   // (B, H, Nq), contiguous
                const float* __restrict__ D,   // (B, H, Nq), contiguous
                Tensor4<float> dq,             // (B, H, Nq, d), zeroed (default mode)
                float* __restrict__ dQ_partial,// buffers 1 .. P-1, laid out as dq
                Tensor4<float> dk,             // (B, H, Nk, d)
                Tensor4<float> dv,             // (B, H, Nk, d)
                int64_t BH, int Nq, int Nk, int slots, float softmax_scale, bool causal,
                bool deterministic) {
    __shared__ __align__(16) float Q_i[Br][STRIDE];
    __shared__ __align__(16) float dO_i[Br][STRIDE];
    __shared__ __align__(16) float K_j[Bc][STRIDE];
    __shared__ __align__(16) float V_j[Bc][STRIDE];
    __shared__ float P_ij[Br][Bc];   // row r written by one half-warp: no bank conflicts
    __shared__ float dS_ij[Br][Bc];
    __shared__ float L_i[Br], D_i[Br];

    const int Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    const int slot = blockIdx.x % slots;
    const int64_t bh = blockIdx.x / slots;
    const Rows<const float> Q = q.head(bh), K = k.head(bh), V = v.head(bh), dO = dout.head(bh);
    const Rows<float> dK = dk.head(bh), dV = dv.head(bh);
    L += bh * Nq;
    D += bh * Nq;
    // Where this block adds dQ: atomically into dQ, or into its own partial buffer.
    const Rows<float> dQ_out = dq_buffer(dq, dQ_partial, deterministic ? slot : 0, bh, BH, Nq);

    const int r = tile_row(), c = tile_lane();

    for (int j = slot; j < Tc; j += slots) {          // Alg. 2 line 5
        load_tile(K_j, K, j * Bc, Nk);                // line 6
        load_tile(V_j, V, j * Bc, Nk);
        float4 dK_acc = make_float4(0.f, 0.f, 0.f, 0.f);  // line 7
        float4 dV_acc = make_float4(0.f, 0.f, 0.f, 0.f);

        const int col = j * Bc + c;                   // the key of S_ij[r][c]
        const int i_start = causal ? (j * Bc) / Br : 0;
        for (int i = i_start; i < Tr; ++i) {          // line 8
            load_tile(Q_i, Q, i * Br, Nq);            // line 9
            load_tile(dO_i, dO, i * Br, Nq);
            if (threadIdx.x < Br) {
                const int q_row = i * Br + threadIdx.x;
                L_i[threadIdx.x] = q_row < Nq ? L[q_row] : 0.f;
                D_i[threadIdx.x] = q_row < Nq ? D[q_row] : 0.f;
            }
            __syncthreads();                          // Q_i, dO_i, L_i, D_i (and K_j, V_j) loaded

            // A hidden score gets P = dS = 0 outright: S does not depend on it, and 0 * NaN
            // would carry a NaN of a hidden key into the gradients of the queries it is hidden from.
            const int row = i * Br + r;
            const bool hidden = row >= Nq || masked(row, col, Nk, causal);
            const float s = softmax_scale * dot_row(Q_i[r], K_j[c]);                // line 10
            const float p = hidden ? 0.f : expf(s - L_i[r]);                        // line 11
            const float dp = dot_row(dO_i[r], V_j[c]);                              // line 13
            P_ij[r][c] = p;
            dS_ij[r][c] = hidden ? 0.f : p * (dp - D_i[r]);                         // line 14
            __syncthreads();                          // P_ij and dS_ij are complete

            // line 12: dV_j[r] += sum_k P_ij[k][r] * dO_i[k]
            // line 16: dK_j[r] += sum_k dS_ij[k][r] * Q_i[k]
#pragma unroll
            for (int k = 0; k < Br; ++k) {
                if (!above_diagonal(i * Br + k, j * Bc + r, causal)) {
                    fma4(dV_acc, P_ij[k][r], *reinterpret_cast<const float4*>(&dO_i[k][4 * c]));
                    fma4(dK_acc, dS_ij[k][r], *reinterpret_cast<const float4*>(&Q_i[k][4 * c]));
                }
            }

            // line 15: dQ_i[r] += scale * sum_k dS_ij[r][k] * K_j[k]
            float4 dq = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int k = 0; k < Bc; ++k)
                if (!above_diagonal(row, j * Bc + k, causal))
                    fma4(dq, dS_ij[r][k], *reinterpret_cast<const float4*>(&K_j[k][4 * c]));
            if (row < Nq) {
                float* out = dQ_out[row] + 4 * c;
                if (deterministic) {
                    // Only this block writes this buffer, and only this thread this float4:
                    // a plain store in its first round (j = slot), which wrote every query
                    // tile from i_start on, then a read-modify-write, j = slot + slots, ...
                    float4 sum = j == slot ? make_float4(0.f, 0.f, 0.f, 0.f) : *reinterpret_cast<float4*>(out);
                    fma4(sum, softmax_scale, dq);
                    *reinterpret_cast<float4*>(out) = sum;
                } else {
                    atomicAdd(out + 0, softmax_scale * dq.x);
                    atomicAdd(out + 1, softmax_scale * dq.y);
                    atomicAdd(out + 2, softmax_scale * dq.z);
                    atomicAdd(out + 3, softmax_scale * dq.w);
                }
            }
            __syncthreads();                          // Q_i, dO_i, P_ij, dS_ij, K_j, V_j read: free to overwrite
        }

        // line 18: write dK_j, dV_j (zero for keys that no query sees)
        const int key = j * Bc + r;
        if (key < Nk) {
            *reinterpret_cast<float4*>(dK[key] + 4 * c) =
                make_float4(softmax_scale * dK_acc.x, softmax_scale * dK_acc.y,
                            softmax_scale * dK_acc.z, softmax_scale * dK_acc.w);
            *reinterpret_cast<float4*>(dV[key] + 4 * c) = dV_acc;
        }
    }
}

// Drop the 128-byte line at p (128-byte aligned) from L2 without writing it back: its data
// becomes undefined. For buffers that are dead.
__device__ __forceinline__ void discard_l2_line(const void* p) {
    asm volatile("discard.global.L2 [%0], 128;\n" :: "l"(p) : "memory");
}

// Deterministic mode: dQ = buffer 0 + buffer 1 + ... + buffer P-1, in that order; buffer 0 is
// dQ itself, buffers 1 .. P-1 are dQ_partial[0 .. P-2], each laid out as dQ.
// Block p's first key tile is j = p, and in that round it stores its share of every query tile
// it reaches: all of them, or, causal, the tiles i >= p (as Br = Bc, the queries of tile i see
// no key of a tile j > i). So a row of query tile i sums the partials 0 .. P - 1, or, causal,
// 0 .. min(P - 1, i): the others were never written.
// The partial buffers are dead once summed, but many of their lines, just written, are still
// in L2, which would write them back to DRAM later (up to P - 1 copies of dQ). discard.global.L2
// drops a 128-byte line without writing it back: the first of the 8 threads that read a line
// (float4 each, of one row; dQ's rows start 256-byte aligned) discards it once all 8 are
// done. About 2% of the deterministic backward at N = 1024 (benchmarks/NOTES.md).
__global__ void dq_sum_kernel(const float* __restrict__ dQ_partial,  // (P - 1) buffers, laid out as dq
                              Tensor4<float> dq,                     // buffer 0
                              int64_t BH, int P, int Nq, int tile_rows, bool causal) {
    const int64_t n4 = BH * Nq * (d / 4), buffer = BH * Nq * d;  // float4s to sum; floats in a buffer
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    // The loop runs over the block's first index, so that every lane of a warp takes each
    // turn (and meets __syncwarp) whether or not its own index is in range.
    for (int64_t first = (int64_t)blockIdx.x * blockDim.x; first < n4; first += stride) {
        const int64_t idx = first + threadIdx.x;    // float4 c4 of row `row` of head bh
        const int c4 = (int)(idx % (d / 4)), row = (int)(idx / (d / 4) % Nq);
        const int parts = idx >= n4 ? 0 : causal ? min(P, row / tile_rows + 1) : P;
        float* const out = dq.head(idx / (d / 4) / Nq)[row] + 4 * c4;
        const int64_t at = out - dq.data;           // the same place in every buffer
        if (parts > 0) {
            float4 sum = *reinterpret_cast<float4*>(out);
            for (int p = 1; p < parts; ++p) {
                const float4 x = *reinterpret_cast<const float4*>(dQ_partial + (p - 1) * buffer + at);
                sum.x += x.x; sum.y += x.y; sum.z += x.z; sum.w += x.w;
            }
            *reinterpret_cast<float4*>(out) = sum;
        }
        __syncwarp();  // the 8 threads of each line have read it
        if (c4 % 8 == 0)
            for (int p = 1; p < parts; ++p) discard_l2_line(dQ_partial + (p - 1) * buffer + at);
    }
}

// -----------------------------------------------------------------------------
// Launchers (plain CUDA: pointers in, error code out; every launch is checked)
// -----------------------------------------------------------------------------
// All tensors are float32; the rows of q, k, v, dout, o, dq, dk, dv are 16-byte aligned
// (their strides multiples of 4 floats); L, D and the partial buffers are contiguous, and dq
// is dense (its rows 256-byte aligned), as the binding allocates it; BH = B * H.

// How many dQ partial buffers the deterministic backward uses: P = min(Tc, DQ_PARTIALS).
int dq_partials(int Nk) { return Nk == 0 ? 0 : std::min(cdiv(Nk, Bc), DQ_PARTIALS); }

cudaError_t forward(In q, In k, In v, Out o, float* L, int64_t BH, int Nq, int Nk, float softmax_scale,
                    bool causal, cudaStream_t stream) {
    const int64_t blocks = BH * cdiv(Nq, Br);
    if (blocks == 0) return cudaSuccess;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    forward_kernel<<<(unsigned)blocks, THREADS, 0, stream>>>(q, k, v, o, L, Nq, Nk, softmax_scale, causal);
    return cudaGetLastError();
}

// Alg. 2 line 4 for every part: D = rowsum(dO * O); and line 3, dq = 0, unless dq.data is
// null; and `count` ints at `counters` = 0.
cudaError_t backward_preprocess(In dout, In o, float* D, Out dq, int* counters, int64_t count, int64_t BH, int Nq,
                                cudaStream_t stream) {
    int64_t blocks = BH * cdiv(Nq, Br);
    if (blocks == 0 && count > 0) blocks = 1;  // no rows (Nq = 0), only the counters to zero
    if (blocks == 0) return cudaSuccess;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    preprocess_kernel<<<(unsigned)blocks, THREADS, 0, stream>>>(dout, o, D, dq, counters, count, Nq);
    return cudaGetLastError();
}

// The deterministic mode's last step, for every part: dq += buffers 1 .. P-1 of dq_partial,
// in that order. tile_rows: the query rows of the part's tiles (causal: which buffers a
// query row received).
cudaError_t sum_dq_partials(const float* dq_partial, Out dq, int64_t BH, int Nq, int P,
                            int tile_rows, bool causal, cudaStream_t stream) {
    if (BH == 0 || Nq == 0 || P <= 1) return cudaSuccess;  // P = 1: dq is the only buffer
    const int64_t n4 = BH * Nq * d / 4;
    const unsigned blocks = (unsigned)std::min<int64_t>((n4 + THREADS - 1) / THREADS, 65536);
    dq_sum_kernel<<<blocks, THREADS, 0, stream>>>(dq_partial, dq, BH, P, Nq, tile_rows, causal);
    return cudaGetLastError();
}

// Default mode: the preprocess zeroes dq, and the kernel adds into it. Deterministic mode:
// dq is partial buffer 0, dq_partial holds buffers 1 .. P-1 ((P - 1) * BH * Nq * d floats,
// P = dq_partials(Nk); unused when P = 1).
cudaError_t backward(In dout, In q, In k, In v, In o, const float* L, float* D, Out dq, float* dq_partial,
                     Out dk, Out dv, int64_t BH, int Nq, int Nk, float softmax_scale, bool causal,
                     bool deterministic, cudaStream_t stream) {
    if (BH == 0 || Nk == 0) return cudaSuccess;
    const int P = dq_partials(Nk);
    const int slots = deterministic ? P : cdiv(Nk, Bc);  // deterministic: a block per buffer
    if (BH * slots > INT32_MAX) return cudaErrorInvalidConfiguration;
    Out zeroed = dq;
    if (deterministic) zeroed.data = nullptr;
    cudaError_t err = backward_preprocess(dout, o, D, zeroed, nullptr, 0, BH, Nq, stream);
    if (err != cudaSuccess) return err;
    backward_kernel<<<(unsigned)(BH * slots), THREADS, 0, stream>>>(
        q, k, v, dout, L, D, dq, dq_partial, dk, dv, BH, Nq, Nk, slots, softmax_scale, causal, deterministic);
    err = cudaGetLastError();
    if (err != cudaSuccess || !deterministic) return err;
    return sum_dq_partials(dq_partial, dq, BH, Nq, P, Br, causal, stream);
}

}  // namespace tutorial

// FlashAttention is complete here: Part I's kernels compute O and L, and dQ, dK, dV in
// both modes, for any Nq, Nk, causal or not. Part II computes the same tiles with the
// tensor cores, 64 x 64 at a time, about 5x faster.

// =============================================================================
// Part II. Tensor cores: 64 x 64 tiles (kernel="fast", the default before Hopper)
// =============================================================================
// The same Algorithm 1 and 2, the same loop order and the same determinism contract as
// Part I; what changes is how a tile product is computed, and how the blocks share the
// work. The steps from Part I, with what each bought (H100, B = 2, H = 8, N = 4096,
// non-causal, forward / backward ms; benchmarks/NOTES.md has the measurements):
//   Part I: 16 x 16 tiles, FP32 FMAs with both operands from shared memory   6.97 / 16.1
//   1. 64 x 64 tiles, a warp per 16 rows, products on the tensor cores
//      (mma.sync, 3xTF32), tiles loaded by cp.async                         3.01 / 10.7
//   2. staging: each tile's product summed from 0 and added with FP32 adds
//      (errors 8x PyTorch's memory-efficient attention's, now the same)     2.98 / 10.9
//   3. rows padded instead of swizzled, a 3-instruction split, edge and
//      interior copies of the loop bodies, a single-buffered backward       1.35 / 3.15
//   4. deterministic mode: one block per key tile, chained by counters
//      (its overhead over the default mode: up to +18% before, +1-9% after)
//   5. causal backward walks the query tiles downward; up to 1024 keys one
//      chain into dQ itself (deterministic overhead +17% -> +6%, N = 1024)
//   6. blocks take their key tiles by flags: no dependence on the order in
//      which blocks start (deterministic mode, about +1%)
//   7. a second copy for the causal diagonal only, the last tiles masked in
//      the interior copy: short sequences run one copy's code (N = 65, B = 2,
//      forward + backward 63.6 -> 31.5 us; longer ones unchanged)
//
// How:
//   * 64 x 64 tiles, one per block of 4 warps. Each warp owns 16 rows of the tile and
//     computes its products with the tensor cores' mma.sync.m16n8k8 instruction: a
//     16 x 8 block of C += A (16 x 8) B (8 x 8), 4 floats of C per lane.
//   * FP32 accuracy on the tensor cores ("3xTF32", as PyTorch's memory-efficient FP32
//     attention and CUTLASS's FastF32 do): an FP32 number x is split into x_big, its top
//     11 significant bits rounded (a TF32 number), and x_small = x - x_big, of which the
//     mma reads the top 11 bits; a*b = a_big*b_big + a_big*b_small + a_small*b_big up to
//     about 2^-22 |a*b|, near FP32's rounding. Three mma per product, FP32 accumulators.
//   * Tiles reach shared memory by cp.async, the next tile while this one is computed.
//     A tile row is padded from 64 to 68 floats, so that the two ways the warps read
//     tiles hit 32 different banks, and every offset in the unrolled loops is a constant.
//   * The mma's k index may be any permutation of the summed dimension, as long as A and
//     B use the same one. Two are used: over d, lane t's k = t and t + 4 are columns
//     8t and 8t + 1 (and the next k-chunk's 8t + 2, 8t + 3), so one float4 feeds two
//     k-chunks; over keys (or queries), k = t and t + 4 are 2t and 2t + 1, which is
//     where the accumulator fragment of S = QK^T keeps them: P feeds P V as it is.
//   * The tile on the causal diagonal runs a second copy of each phase (`Diagonal`); the
//     others run one whose masks (for the last tiles, past Nq or Nk) full tiles skip.
//   * Causal: in the tile on the diagonal a warp skips the 8-column blocks that all its
//     rows are hidden from. In the two blocks that the diagonal crosses, a hidden pair
//     (P = 0) still meets the other operand inside one mma; a NaN or Inf there would
//     give 0 * NaN. Those operands are read with non-finite values set to 0, and the
//     rare warp that found one adds the products of its visible pairs one by one
//     (add_nonfinite_products), so a NaN reaches exactly the rows that see it.
namespace fast {

constexpr int Br = 64;            // query rows of a tile
constexpr int Bc = 64;            // key rows of a tile
constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
constexpr int MMA_M = 16;         // rows of one warp's share of a tile
constexpr int STRIDE = d + 4;     // floats from one row of a shared tile to the next
constexpr int TILE = 64 * STRIDE; // floats in a shared tile (17 KB)
// Most dQ partial buffers in the deterministic backward. Fewer buffers cost less memory
// and less summing (the sum reads P copies of dQ), and make each buffer's chain of key
// tiles longer. With 4 (3 copies of dQ besides dQ), forward and backward peak within
// 1.25x the memory of PyTorch's memory-efficient attention.
constexpr int DQ_PARTIALS = 4;
// Causal, the deterministic backward with at most this many key tiles (1024 keys) chains
// them all into dQ itself (P = 1: no buffer, no sum); longer, one chain would cost +14%
// to +21% over the default mode.
constexpr int SINGLE_CHAIN = 16;
constexpr float LOG2E = 1.4426950408889634f;

static_assert(Br == WARPS * MMA_M && Bc == WARPS * MMA_M, "a warp owns 16 rows of a tile");
static_assert(Br == Bc, "the causal diagonal of query tile i is key tile i");
static_assert(d == 64, "a tile row is 8 n-blocks of 8 columns, read in two stages of 32");
static_assert(STRIDE % 32 == 4, "row r + 1 starts 4 banks after row r");

// --- shared tiles ------------------------------------------------------------------

// Row r of a tile starts at r * STRIDE, 4 banks (mod 32) after row r - 1. The two reads:
//   * a float4 of rows g (lane / 4) at columns c + 8t (t = lane % 4): banks 4g + 8t + c .. + 3,
//     and the 8 lanes of a quarter warp (g = 2k, 2k + 1) cover the 32 banks;
//   * a float of rows 2t and 2t + 1 (+ 8k) at column 8n + g: banks 8t + g (+ 4), 32 of them.
__device__ __forceinline__ int at(int r, int c) { return r * STRIDE + c; }
__device__ __forceinline__ float4 row4(const float* tile, int r, int c) {
    return *reinterpret_cast<const float4*>(tile + at(r, c));
}
__device__ __forceinline__ float2 row2(const float* tile, int r, int c) {
    return *reinterpret_cast<const float2*>(tile + at(r, c));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Start copying rows row0 .. row0 + 63 of an (N, d) matrix into a tile; rows past N are zeros.
__device__ __forceinline__ void load_tile_async(float* tile, Rows<const float> src, int row0, int N) {
    const int r0 = threadIdx.x / 16, c = 4 * (threadIdx.x % 16);  // rows r0, r0 + 8, ..., r0 + 56
    const float* from = src[row0 + r0] + c;
    const int64_t step = (int64_t)(THREADS / 16) * src.stride;
#pragma unroll
    for (int r = r0; r < 64; r += THREADS / 16, from += step) {
        const bool inside = row0 + r < N;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(smem_addr(tile + at(r, c))), "l"(inside ? from : src.start + c), "r"(inside ? 16 : 0));
    }
}
// Start copying x[row0 .. row0 + 63] (one float per row, zeros past N) into v[0 .. 63].
__device__ __forceinline__ void load_row_values_async(float* v, const float* x, int row0, int N, int r) {
    const bool inside = row0 + r < N;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
                 :: "r"(smem_addr(v + r)), "l"(x + (inside ? row0 + r : 0)), "r"(inside ? 4 : 0));
}

// --- 3xTF32 tensor-core products ------------------------------------------------------

struct FragA { uint32_t big[4], small[4]; };  // a 16 x 8 A operand, split
struct FragB { uint32_t big[2], small[2]; };  // an 8 x 8 B operand, split

// x = big + small. The mma reads a TF32 operand from the top 19 bits of a register and
// ignores the low 13, so big = x + half a TF32 unit (0x1000) in the bits is x rounded to
// nearest TF32, ties away (cvt.rna.tf32.f32, which ptxas compiles into this add plus a
// finiteness test and a select), and small = x - big is exact, of which the mma keeps the
// top 11 bits. Three instructions instead of seven. A NaN or Inf x gives a NaN small, so
// its products are NaN whatever the add did to big's bits.
__device__ __forceinline__ void split(float x, uint32_t& big, uint32_t& small) {
    big = __float_as_uint(x) + 0x1000u;
    small = __float_as_uint(x - __uint_as_float(big & 0xffffe000u));
}
// Lane (g = lane / 4, t = lane % 4) holds A[g][t], A[g + 8][t], A[g][t + 4], A[g + 8][t + 4].
__device__ __forceinline__ FragA frag_a(float a0, float a1, float a2, float a3) {
    FragA f;
    split(a0, f.big[0], f.small[0]);
    split(a1, f.big[1], f.small[1]);
    split(a2, f.big[2], f.small[2]);
    split(a3, f.big[3], f.small[3]);
    return f;
}
// Lane (g, t) holds B[t][g] and B[t + 4][g].
__device__ __forceinline__ FragB frag_b(float b0, float b1) {
    FragB f;
    split(b0, f.big[0], f.small[0]);
    split(b1, f.big[1], f.small[1]);
    return f;
}

// C (16 x 8) += A B in TF32; lane (g, t) holds C[g][2t], C[g][2t + 1], C[g + 8][2t], C[g + 8][2t + 1].
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// C += A B in FP32 accuracy: the two small cross terms first, then the big product.
__device__ __forceinline__ void mma_3xtf32(float (&c)[4], const FragA& a, const FragB& b) {
    mma_tf32(c, a.small, b.big);
    mma_tf32(c, a.big, b.small);
    mma_tf32(c, a.big, b.big);
}

// A warp's share of a (16 rows) x 64 product is acc[8][4]: n-block nb holds columns
// 8nb .. 8nb + 7, lane (g, t) the rows g and g + 8, columns 8nb + 2t and 8nb + 2t + 1.
//
// Staging: the tensor cores round their FP32 sums toward zero, so an accumulator that
// takes hundreds of mma drifts (a bias of up to one unit in the last place per mma). The
// products below sum at most 24 mma into a fresh accumulator, and the kernels add that to
// their running sums (O, dK, dV, dQ) with FP32 adds, which round to nearest, as CUTLASS's
// 3xTF32 GEMMs do.
__device__ __forceinline__ void add_to(float (&acc)[8][4], const float (&x)[8][4]) {
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nb][e] += x[nb][e];
}

// out = A Y, where A (16 x 64 over k) is in the accumulator layout (its columns are k) and
// Y is a shared tile whose rows are k: one stage, to be added to an accumulator with FP32 adds.
// k-chunks below kc_begin or from kc_end on are skipped (causal: pairs all hidden); in the
// chunks kc_mixed and kc_mixed + 1 non-finite values of Y are read as 0, and the return value
// says whether there were any. Off the causal diagonal the callers pass 0, 8 and -2.
__device__ __forceinline__ bool mma_tile(float (&out)[8][4], const float (&a)[8][4], const float* Y,
                                         int kc_begin, int kc_end, int kc_mixed) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    bool nonfinite = false;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) out[nb][0] = out[nb][1] = out[nb][2] = out[nb][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < 8; ++kc) {
        if (kc < kc_begin || kc >= kc_end) continue;
        // keys (or queries) 8kc + 2t and 8kc + 2t + 1 are this lane's k = t and t + 4
        const FragA fa = frag_a(a[kc][0], a[kc][2], a[kc][1], a[kc][3]);
        const bool mixed = kc == kc_mixed || kc == kc_mixed + 1;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            float y0 = Y[at(8 * kc + 2 * t, 8 * nb + g)], y1 = Y[at(8 * kc + 2 * t + 1, 8 * nb + g)];
            if (mixed) {
                nonfinite |= !isfinite(y0) || !isfinite(y1);
                y0 = isfinite(y0) ? y0 : 0.f;
                y1 = isfinite(y1) ? y1 : 0.f;
            }
            mma_3xtf32(out[nb], fa, frag_b(y0, y1));
        }
    }
    return nonfinite;
}

// acc (16 rows x 64) = X (16 rows of a tile, from row x0) Z^T (Z: 64 rows of a tile), over d,
// in two stages of 32. Column blocks from nb_end on stay 0 (causal: hidden).
__device__ __forceinline__ void mma_rows_tiles(float (&acc)[8][4], const float* X, int x0, const float* Z,
                                               int nb_begin, int nb_end) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) acc[nb][0] = acc[nb][1] = acc[nb][2] = acc[nb][3] = 0.f;
#pragma unroll
    for (int stage = 0; stage < d; stage += 32) {
        float part[8][4] = {};
#pragma unroll
        for (int c = stage; c < stage + 8; c += 4) {
            // d = c + 8t, c + 8t + 1 are one k-chunk's k = t, t + 4; c + 8t + 2, + 3 the next one's
            const float4 lo = row4(X, x0 + g, c + 8 * t), hi = row4(X, x0 + g + 8, c + 8 * t);
            const FragA a0 = frag_a(lo.x, hi.x, lo.y, hi.y), a1 = frag_a(lo.z, hi.z, lo.w, hi.w);
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
                if (nb < nb_begin || nb >= nb_end) continue;
                const float4 z = row4(Z, 8 * nb + g, c + 8 * t);
                mma_3xtf32(part[nb], a0, frag_b(z.x, z.y));
                mma_3xtf32(part[nb], a1, frag_b(z.z, z.w));
            }
        }
        add_to(acc, part);
    }
}

// The rare path of the causal diagonal (see the section's header): a warp whose operand Y
// held a non-finite value in its diagonal 16 x 16 block adds, for each of its outputs, the
// products that mma_tile read as 0: coef(r, k) * Y[r0 + k][col] over the pairs (r, k) of
// the block that are visible and have a non-finite Y. The warp's rows are r0 .. r0 + 15 and
// so are the block's k; the coefficients (P or dS) are in the tile C with queries as rows.
// Queries as the warp's rows (O, dQ): coef(r, k) = C[r0 + r][r0 + k], visible when k <= r.
// Keys as the warp's rows (dV, dK): coef(r, k) = C[r0 + k][r0 + r], visible when k >= r.
__device__ __forceinline__ void add_nonfinite_products(float (&acc)[8][4], const float* C, const float* Y,
                                                       int r0, bool keys_are_rows) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e / 2);
        for (int k = 0; k < MMA_M; ++k) {
            const bool visible = keys_are_rows ? k >= r : k <= r;
            const float c = keys_are_rows ? C[at(r0 + k, r0 + r)] : C[at(r0 + r, r0 + k)];
#pragma unroll
            for (int nb = 0; nb < 8; ++nb) {
                const float y = Y[at(r0 + k, 8 * nb + 2 * t + e % 2)];
                if (visible && !isfinite(y)) acc[nb][e] += c * y;
            }
        }
    }
}

// Write a warp's 16 x 64 accumulator fragment into rows r0 .. r0 + 15 of a tile.
__device__ __forceinline__ void store_rows(float* tile, const float (&acc)[8][4], int r0) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) tile[at(r0 + g + 8 * (e / 2), 8 * nb + 2 * t + e % 2)] = acc[nb][e];
}
// Write a warp's 16 x 64 accumulator fragment into the columns r0 .. r0 + 15 of a tile (the
// fragment's rows become the tile's columns).
__device__ __forceinline__ void store_transposed(float* tile, const float (&acc)[8][4], int r0) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) tile[at(8 * nb + 2 * t + e % 2, r0 + g + 8 * (e / 2))] = acc[nb][e];
}


// 2^x in one instruction (MUFU.EX2: relative error below 2^-22; results below 2^-126 flush
// to 0, which a probability that small is anyway). exp2f adds a denormal range fix-up.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The loops below run each phase in two copies: with Diagonal() for the tile on the causal
// diagonal, with Interior() for the others. The interior copy also masks the last tiles
// (past Nq or Nk), in a loop that full tiles branch over, rather than sending them to a
// copy of their own: the copies together are more code than an SM's instruction caches
// hold, and a block that runs two of them runs both slower (benchmarks/NOTES.md, v13).
struct Interior { static constexpr bool diagonal = false; };
struct Diagonal { static constexpr bool diagonal = true; };

// -----------------------------------------------------------------------------
// Forward: Algorithm 1 (FlashAttention-2 loop order), 64 x 64 tiles
// -----------------------------------------------------------------------------
// One block per (query tile i, batch * head); the query tiles with the most work (causal:
// the last ones) are launched first. Warp w owns query rows 64i + 16w .. 64i + 16w + 15.
//   line 4  (load Q_i)                 : cp.async, with K_0 and V_0
//   line 5  (O_i = 0, l_i = 0, m_i = -inf): O_i[8][4], l_i[2], m_i[2] in registers
//   line 6  (for j)                    : the j loop; causal stops at the diagonal tile j = i
//   line 7  (load K_j, V_j)            : cp.async into one of two stages; j + 1 loads during j
//   line 8  (S_ij = Q_i K_j^T)         : scores(), times scale * log2(e): exp2 replaces exp
//   line 9  (online softmax)           : online_softmax(): S_ij becomes P~_ij in place
//   line 10 (O_i = alpha O_i + P V_j)  : add_pv(); P~_ij feeds the mma as it is (see above)
//   lines 12-15 (O_i / l_i, L_i)       : after the loop, with 1/l_i applied to O_i once
// In a warp, S_ij[8][4] and O_i[8][4] are its 16 rows in the accumulator layout (see
// mma_tile); m_i[h] and l_i[h] belong to rows g and g + 8 (h = 0, 1), and l_i holds only
// this lane's part of the row sum until the end adds the 4 lanes of a row.

// line 8: S_ij = Q_i K_j^T (16 x 64 per warp) times scale * log2(e); hidden keys get -inf.
// Column blocks from nb_end on are all hidden (causal diagonal) and skipped.
template <bool diagonal>
__device__ __forceinline__ void scores(float (&S_ij)[8][4], const float* Q_i, const float* K_j, int i, int j,
                                       int nb_end, int Nk, bool causal, float scale_log2) {
    const int r0 = MMA_M * (threadIdx.x / 32), g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    mma_rows_tiles(S_ij, Q_i, r0, K_j, 0, nb_end);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) S_ij[nb][e] *= scale_log2;
    if (!diagonal && (j + 1) * Bc <= Nk) return;  // no hidden key
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = i * Br + r0 + g + 8 * (e / 2), key = j * Bc + 8 * nb + 2 * t + e % 2;
            if (diagonal ? masked(row, key, Nk, causal) : key >= Nk) S_ij[nb][e] = -INFINITY;
        }
}

// line 9: the online softmax, in base 2. The new row max m_i, then S_ij becomes
// P~_ij = exp2(S_ij - m_i) in place, and alpha = exp2(m_i old - m_i new) rescales l_i and
// O_i. Key 0 is in tile 0 and no row hides it, so m_i is finite from the first tile on,
// and exp2(-inf - m_i) = 0 for hidden keys.
__device__ __forceinline__ void online_softmax(float (&S_ij)[8][4], float (&O_i)[8][4], float (&m_i)[2],
                                               float (&l_i)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float row_max = m_i[h];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) row_max = fmaxf(row_max, fmaxf(S_ij[nb][2 * h], S_ij[nb][2 * h + 1]));
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));  // the 4 lanes of a row
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
        const float alpha = exp2_approx(m_i[h] - row_max);
        m_i[h] = row_max;
        l_i[h] *= alpha;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            S_ij[nb][2 * h] = exp2_approx(S_ij[nb][2 * h] - row_max);
            S_ij[nb][2 * h + 1] = exp2_approx(S_ij[nb][2 * h + 1] - row_max);
            l_i[h] += S_ij[nb][2 * h] + S_ij[nb][2 * h + 1];
            O_i[nb][2 * h] *= alpha;
            O_i[nb][2 * h + 1] *= alpha;
        }
    }
}

// line 10: O_i += P~_ij V_j (alpha was applied by online_softmax). Returns whether, on the
// causal diagonal, this warp's rows of V_j held a non-finite value (see add_nonfinite_pv).
__device__ __forceinline__ bool add_pv(float (&O_i)[8][4], const float (&P_ij)[8][4], const float* V_j, bool diagonal,
                                       int nb_end) {
    const int w = threadIdx.x / 32;
    float pv[8][4];
    const bool nonfinite = mma_tile(pv, P_ij, V_j, 0, nb_end, diagonal ? 2 * w : -2);
    add_to(O_i, pv);
    return nonfinite;
}
// The rare path of line 10 on the diagonal: the warp adds its visible products one by one,
// with P~_ij from `spare`, a shared tile free at the diagonal (the last tile).
__device__ __forceinline__ void add_nonfinite_pv(float (&O_i)[8][4], const float (&P_ij)[8][4], const float* V_j,
                                                 float* spare) {
    const int r0 = MMA_M * (threadIdx.x / 32);
    store_rows(spare, P_ij, r0);
    __syncwarp();
    add_nonfinite_products(O_i, spare, V_j, r0, false);
}

__global__ void __launch_bounds__(THREADS)
forward_kernel(Tensor4<const float> q, Tensor4<const float> k, Tensor4<const float> v, Tensor4<float> o,
               float* __restrict__ L, int64_t BH, int Nq, int Nk, float softmax_scale, bool causal) {
    extern __shared__ __align__(16) float smem[];
    float* Q_i = smem;
    // Two stages of K_j, V_j: stage st holds K_j at smem + (1 + 2 st) TILE, V_j right after.
    auto K_stage = [&](int st) { return smem + (1 + 2 * st) * TILE; };
    auto V_stage = [&](int st) { return smem + (2 + 2 * st) * TILE; };

    const int Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    const int i = Tr - 1 - (int)(blockIdx.x / BH);  // query tile
    const int64_t bh = blockIdx.x % BH;
    const Rows<const float> Q = q.head(bh), K = k.head(bh), V = v.head(bh);  // this head's matrices
    L += bh * Nq;

    const int w = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const int r0 = MMA_M * w;                       // the warp's first row in the tile
    const float scale_log2 = softmax_scale * LOG2E;
    const int last_row = min((i + 1) * Br, Nq) - 1;
    const int Tc_end = causal ? min(Tc, last_row / Bc + 1) : Tc;

    load_tile_async(Q_i, Q, i * Br, Nq);            // line 4
    load_tile_async(K_stage(0), K, 0, Nk);          // line 7 for j = 0
    load_tile_async(V_stage(0), V, 0, Nk);
    cp_async_commit();

    float O_i[8][4] = {};                           // line 5: unnormalized
    float m_i[2] = {-INFINITY, -INFINITY};          // line 5: running max, base 2
    float l_i[2] = {0.f, 0.f};                      // line 5: this lane's part of the row sums

    // Lines 8-10 for key tile j, from stage st.
    auto step = [&](int j, int st, auto kind) {
        constexpr bool diagonal = decltype(kind)::diagonal;  // keys 16w + 16 .. 63 are hidden from warp w
        const int nb_end = diagonal ? 2 * w + 2 : 8;
        float S_ij[8][4];
        scores<diagonal>(S_ij, Q_i, K_stage(st), i, j, nb_end, Nk, causal, scale_log2);  // line 8
        online_softmax(S_ij, O_i, m_i, l_i);                                          // line 9
        const float (&P_ij)[8][4] = S_ij;
        const bool nonfinite = add_pv(O_i, P_ij, V_stage(st), diagonal, nb_end);      // line 10
        if (diagonal && __any_sync(0xffffffffu, nonfinite)) add_nonfinite_pv(O_i, P_ij, V_stage(st), K_stage(1 - st));
    };

    for (int j = 0; j < Tc_end; ++j) {              // line 6
        cp_async_wait_all();
        __syncthreads();                            // K_j, V_j landed; all warps are done with j - 1's stage
        if (j + 1 < Tc_end) {                       // line 7 for j + 1, while j is computed
            load_tile_async(K_stage((j + 1) % 2), K, (j + 1) * Bc, Nk);
            load_tile_async(V_stage((j + 1) % 2), V, (j + 1) * Bc, Nk);
            cp_async_commit();
        }
        if (causal && j == i) step(j, j % 2, Diagonal());
        else step(j, j % 2, Interior());
    }

    // lines 12-15: write O_i / l_i and L_i = m_i + log(l_i) (natural log)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l_row = l_i[h] + __shfl_xor_sync(0xffffffffu, l_i[h], 1);  // the 4 lanes of a row
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = i * Br + r0 + g + 8 * h;
        if (row >= Nq) continue;
        const float inv_l = 1.f / l_row;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
            *reinterpret_cast<float2*>(o.head(bh)[row] + 8 * nb + 2 * t) =
                make_float2(O_i[nb][2 * h] * inv_l, O_i[nb][2 * h + 1] * inv_l);
        if (t == 0) L[row] = m_i[h] / LOG2E + logf(l_row);
    }
}

// -----------------------------------------------------------------------------
// Backward: Algorithm 2 (FlashAttention-2 loop order), 64 x 64 tiles
// -----------------------------------------------------------------------------
// One block per (key tile j, batch * head), in both modes; the key tiles with the most work
// (causal: the first ones) are launched first. Warp w owns keys 64j + 16w .. + 15 for dK_j
// and dV_j, and queries 64i + 16w .. + 15 for dQ_i.
//   line 6  (load K_j, V_j)             : cp.async, once per j
//   line 7  (dK_j = dV_j = 0)           : dK_j[8][4], dV_j[8][4] in registers
//   line 8  (for i)                     : non-causal i = 0 .. Tr - 1; causal i = Tr - 1 down
//                                         to j, the diagonal tile (why: WriteOrder)
//   line 9  (load Q_i, dO_i, L_i, D_i)  : cp.async; the next tile loads while dQ_i is computed
//   lines 10-14, 16                     : dk_dv_phase(), keys as the warp's rows
//   line 15 (dQ_i += scale dS_ij K_j)   : dq_phase(), queries as the warp's rows
//   line 18 (write dK_j, dV_j)          : write_dk_dv(), after the i loop

// *p += v for two floats, atomically (one vector atomic on sm_90, two before).
__device__ __forceinline__ void atomic_add2(float2* p, float2 v) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(p, v);
#else
    atomicAdd(&p->x, v.x);
    atomicAdd(&p->y, v.y);
#endif
}

// Deterministic mode: key tile j adds its dQ shares into partial buffer j mod P
// (P = min(Tc, DQ_PARTIALS); 1 when causal and Tc <= SINGLE_CHAIN), after tile j - P and
// before tile j + P, so the order of the additions into each buffer is j's order, whatever
// the order in which the blocks run. Tile j < P stores (it is the first), the others add.
// Each warp publishes, after each query tile, how many query tiles it has written (one int
// per warp of each tile, zeroed before the launch), and before it writes the query tile of
// its step n, waits until the same warp of tile j - P has published more than n. Step n is
// the same query tile in both, because both sweep the same way: upward from query tile 0
// when non-causal, downward from the last query tile when causal. (Upward, causal tile j
// would start at query tile j and wait for tile j - P to walk P tiles first; downward both
// start together, and the tiles that only j - P sees come last. So a short causal backward
// needs one buffer only: tile j trails tile j - 1 by part of a step, but has one query tile
// less to walk.) The blocks are scheduled as in the default mode, so both modes take about
// the same time; Part I, simpler, gives each buffer one block that walks its tiles in turn.
//
// A publish is a release store: every write the warp made before it (all its lanes',
// ordered by __syncwarp) is visible to a warp that reads the value with an acquire load.
// The wait polls with relaxed loads, which leave the SM's L1 alone, sleeping a little
// longer after each miss, and makes one acquire load once the value is there.
__device__ __forceinline__ void publish(int* p, int v) {
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int load_relaxed(const int* p) {
    int v;
    asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
// Returns once *p > n; `known` is the last value seen there, the new one is returned.
__device__ __forceinline__ int wait_until_above(const int* p, int n, int known) {
    if (known > n) return known;
    for (unsigned ns = 32; load_relaxed(p) <= n; ns = min(2 * ns, 256u)) __nanosleep(ns);
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(known) : "l"(p) : "memory");
    return known;  // acquire: the writes published before this value are visible
}
struct WriteOrder {
    int* mine = nullptr;            // this warp's count; null in the default mode
    const int* previous = nullptr;  // the same warp's count in tile j - P; null if j < P
    int previous_done = 0;          // the most the previous writer is known to have written
    // The query tiles of steps 0 .. n - 1 are written (lane 0 publishes for the warp).
    __device__ __forceinline__ void written(int n) const {
        if (mine && threadIdx.x % 32 == 0) publish(mine, n);
    }
    // Returns when the previous writer has written the query tile of step n.
    __device__ __forceinline__ void wait_turn(int n) {
        if (!previous) return;
        if (threadIdx.x % 32 == 0) previous_done = wait_until_above(previous, n, previous_done);
        __syncwarp();
    }
};

// The backward's shared tiles: K_j, V_j for the block; Q_i, dO_i, L_i, D_i for the current
// query tile; dS_ij with queries as rows (P_ij^T, with keys as columns, until dS replaces it).
struct BackwardTiles { float *K_j, *V_j, *dS_ij, *Q_i, *dO_i, *L_i, *D_i; };

// Lines 10-14 and 16 for the tiles i, j: the warp's 16 keys are the rows of S_ij^T, and of
// what replaces it in the same registers (P_ij^T, then dP_ij^T, then dS_ij^T). dV_j, dK_j
// accumulate; dS_ij is left in shared memory for line 15. Step n of the sweep publishes,
// half a step after its last writes completed, that steps 0 .. n - 1 are written.
template <bool diagonal>
__device__ __forceinline__ void dk_dv_phase(float (&dK_j)[8][4], float (&dV_j)[8][4], const BackwardTiles& tiles,
                                            int i, int j, int n, int Nq, int Nk, bool causal, float scale_log2,
                                            const WriteOrder& order) {
    const int w = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4, r0 = MMA_M * w;
    // Causal, tile i = j: queries 0 .. 16w - 1 of the tile are hidden from all keys of
    // warp w (column blocks < 2w), and keys 16w + 16 .. 63 from its queries.
    const int first = diagonal ? 2 * w : 0;
    const int mixed = diagonal ? 2 * w : -2;
    // Whether the query in column e of n-block nb is hidden from this lane's key of the pair.
    auto hidden = [&](int nb, int e) {
        const int row = i * Br + 8 * nb + 2 * t + e % 2, key = j * Bc + r0 + g + 8 * (e / 2);
        return row >= Nq || (diagonal ? masked(row, key, Nk, causal) : key >= Nk);
    };
    auto zero_hidden = [&](float (&x)[8][4]) {  // x in S_ij^T's layout
        if (!diagonal && (i + 1) * Br <= Nq && (j + 1) * Bc <= Nk) return;  // a full tile hides no pair
#pragma unroll
        for (int nb = 0; nb < 8; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (hidden(nb, e)) x[nb][e] = 0.f;
    };

    // line 10: S_ij^T = K_j Q_i^T; line 11: P_ij = exp2(S scale log2(e) - L log2(e)), 0 if hidden
    float S_ij[8][4], part[8][4];
    float (&P_ij)[8][4] = S_ij;
    mma_rows_tiles(S_ij, tiles.K_j, r0, tiles.Q_i, first, 8);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float l_row = tiles.L_i[8 * nb + 2 * t + e % 2];
            P_ij[nb][e] = exp2_approx(S_ij[nb][e] * scale_log2 - l_row * LOG2E);
        }
    zero_hidden(P_ij);
    store_transposed(tiles.dS_ij, P_ij, r0);       // P_ij, kept in the warp's columns until dS
    __syncwarp();

    // line 12: dV_j += P_ij^T dO_i (the sum runs over the tile's queries)
    const bool bad_dO = mma_tile(part, P_ij, tiles.dO_i, first, 8, mixed);
    add_to(dV_j, part);
    if (diagonal && __any_sync(0xffffffffu, bad_dO)) add_nonfinite_products(dV_j, tiles.dS_ij, tiles.dO_i, r0, true);

    // line 13: dP_ij^T = V_j dO_i^T; line 14: dS_ij = P_ij (dP_ij - D_i), 0 if hidden
    float (&dP_ij)[8][4] = S_ij;
    mma_rows_tiles(dP_ij, tiles.V_j, r0, tiles.dO_i, first, 8);
    order.written(n);
    float (&dS_ij)[8][4] = S_ij;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = 8 * nb + 2 * t + e % 2;
            const float p = tiles.dS_ij[at(col, r0 + g + 8 * (e / 2))];  // P_ij, as this lane stored it
            dS_ij[nb][e] = p * (dP_ij[nb][e] - tiles.D_i[col]);
        }
    zero_hidden(dS_ij);
    __syncwarp();                                   // all lanes have read P before dS replaces it
    store_transposed(tiles.dS_ij, dS_ij, r0);
    __syncwarp();

    // line 16: dK_j += dS_ij^T Q_i
    const bool bad_Q = mma_tile(part, dS_ij, tiles.Q_i, first, 8, mixed);
    add_to(dK_j, part);
    if (diagonal && __any_sync(0xffffffffu, bad_Q)) add_nonfinite_products(dK_j, tiles.dS_ij, tiles.Q_i, r0, true);
}

// Line 15 for the tiles i, j: dQ_i += scale dS_ij K_j for the warp's 16 queries (rows
// r0 .. r0 + 15 of dS_ij in shared memory, all 64 keys), added atomically into dQ_out, or,
// deterministic, in its turn: stored by the buffer's first writer, added by the others
// (atomically, but alone).
template <bool diagonal>
__device__ __forceinline__ void dq_phase(Rows<float> dQ_out, const BackwardTiles& tiles, int i, int n, int Nq,
                                         float softmax_scale, bool store, WriteOrder& order) {
    const int w = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4, r0 = MMA_M * w;
    const int mixed = diagonal ? 2 * w : -2;
    float dS_rows[8][4], dQ_share[8][4];            // dS_ij's rows r0 .. r0 + 15, in the accumulator layout
#pragma unroll
    for (int kc = 0; kc < 8; ++kc) {
        const float2 lo = row2(tiles.dS_ij, r0 + g, 8 * kc + 2 * t), hi = row2(tiles.dS_ij, r0 + g + 8, 8 * kc + 2 * t);
        dS_rows[kc][0] = lo.x; dS_rows[kc][1] = lo.y; dS_rows[kc][2] = hi.x; dS_rows[kc][3] = hi.y;
    }
    const bool bad_K = mma_tile(dQ_share, dS_rows, tiles.K_j, 0, diagonal ? 2 * w + 2 : 8, mixed);
    if (diagonal && __any_sync(0xffffffffu, bad_K)) add_nonfinite_products(dQ_share, tiles.dS_ij, tiles.K_j, r0, false);
    order.wait_turn(n);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = i * Br + r0 + g + 8 * h;
        if (row >= Nq) continue;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            float2* out = reinterpret_cast<float2*>(dQ_out[row] + 8 * nb + 2 * t);
            const float2 x = make_float2(softmax_scale * dQ_share[nb][2 * h], softmax_scale * dQ_share[nb][2 * h + 1]);
            if (store) *out = x;
            else atomic_add2(out, x);
        }
    }
}

// line 18: write dK_j (times the scale, once) and dV_j; zero for keys no query sees.
__device__ __forceinline__ void write_dk_dv(Rows<float> dK, Rows<float> dV, const float (&dK_j)[8][4], const float (&dV_j)[8][4],
                                            int j, int Nk, float softmax_scale) {
    const int r0 = MMA_M * (threadIdx.x / 32), g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = j * Bc + r0 + g + 8 * h;
        if (key >= Nk) continue;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            *reinterpret_cast<float2*>(dK[key] + 8 * nb + 2 * t) =
                make_float2(softmax_scale * dK_j[nb][2 * h], softmax_scale * dK_j[nb][2 * h + 1]);
            *reinterpret_cast<float2*>(dV[key] + 8 * nb + 2 * t) = make_float2(dV_j[nb][2 * h], dV_j[nb][2 * h + 1]);
        }
    }
}

// Lines 6-18 for key tile j of head bh, tile = j * BH + bh: the work of one block. Chained
// (deterministic, key tile j - P shares the buffer): it writes each query tile in its turn.
__device__ __forceinline__ void backward_key_tile(
        Tensor4<const float> q, Tensor4<const float> k, Tensor4<const float> v, Tensor4<const float> dout,
        const float* __restrict__ L, const float* __restrict__ D, Tensor4<float> dq,
        float* __restrict__ dQ_partial, int* __restrict__ dQ_progress, Tensor4<float> dk, Tensor4<float> dv,
        int64_t BH, int Nq, int Nk, int P, float softmax_scale, bool causal, bool deterministic, bool chained,
        float* smem, int tile) {
    const BackwardTiles tiles{smem, smem + TILE, smem + 2 * TILE, smem + 3 * TILE, smem + 4 * TILE,
                              smem + 5 * TILE, smem + 5 * TILE + Br};
    const int Tr = cdiv(Nq, Br);
    const int j = tile / (int)BH;                   // line 5: the key tile (the grid is below 2^31 blocks)
    const int bh = tile % (int)BH;
    const Rows<const float> Q = q.head(bh), K = k.head(bh), V = v.head(bh), dO = dout.head(bh);
    L += bh * Nq;
    D += bh * Nq;
    const Rows<float> dQ_out = dq_buffer(dq, dQ_partial, deterministic ? j % P : 0, bh, BH, Nq);
    WriteOrder order;                               // chained: this warp's counter, tile j - P's
    if (chained) {
        order.mine = dQ_progress + (int64_t)tile * WARPS + threadIdx.x / 32;
        if (j >= P) order.previous = order.mine - P * BH * WARPS;
    }
    const float scale_log2 = softmax_scale * LOG2E;

    // Start loading tile i of Q, dO, L, D.
    auto load_query_tile = [&](int i) {
        load_tile_async(tiles.Q_i, Q, i * Br, Nq);
        load_tile_async(tiles.dO_i, dO, i * Br, Nq);
        if (threadIdx.x < Br) load_row_values_async(tiles.L_i, L, i * Br, Nq, threadIdx.x);
        else load_row_values_async(tiles.D_i, D, i * Br, Nq, threadIdx.x - Br);
        cp_async_commit();
    };

    float dK_j[8][4], dV_j[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)                  // line 7
#pragma unroll
        for (int e = 0; e < 4; ++e) dK_j[nb][e] = dV_j[nb][e] = 0.f;

    // Line 8's sweep: i = i_first, i_first + di, ..., up to i_end (excluded). Non-causal: 0,
    // 1, ..., Tr - 1. Causal: Tr - 1 down to j, as the queries before tile j see none of its keys.
    const int i_first = causal ? Tr - 1 : 0, di = causal ? -1 : 1;
    const int i_end = causal ? min(j, Tr) - 1 : Tr;

    // Lines 10-16 for the tiles i, j, step n of the sweep.
    auto step = [&](int i, int n, auto kind) {
        constexpr bool diagonal = decltype(kind)::diagonal;
        dk_dv_phase<diagonal>(dK_j, dV_j, tiles, i, j, n, Nq, Nk, causal, scale_log2, order);  // lines 10-14, 16
        __syncthreads();                            // dS_ij is complete; Q_i, dO_i, L_i, D_i are read
        if (i + di != i_end) load_query_tile(i + di);  // line 9, next tile, while dQ_i is computed
        dq_phase<diagonal>(dQ_out, tiles, i, n, Nq, softmax_scale, deterministic && j < P, order);  // line 15
    };

    if (i_first != i_end) {
        load_tile_async(tiles.K_j, K, j * Bc, Nk);  // line 6
        load_tile_async(tiles.V_j, V, j * Bc, Nk);
        load_query_tile(i_first);
    }
    for (int i = i_first; i != i_end; i += di) {    // line 8
        cp_async_wait_all();
        __syncthreads();                            // tile i landed; all warps are done with dS_ij of the last one
        const int n = (i - i_first) * di;
        if (causal && i == j) step(i, n, Diagonal());
        else step(i, n, Interior());
    }
    if (chained) {                                  // every query tile is written
        __syncwarp();
        order.written(Tr);
    }
    write_dk_dv(dk.head(bh), dv.head(bh), dK_j, dV_j, j, Nk, softmax_scale);  // line 18
}

// Deterministic mode: which block computes which tile. Tile t's block is block t, but a
// block may only wait for a tile that a running block has taken, whatever order the GPU
// starts blocks in (CUDA promises none). So a block first takes its own tile (a flag per
// tile, set by atomicExch: exactly one block takes each), then, going back along the
// chain of its buffer (t - stride, t - 2 stride, ...), every tile that no block has taken
// yet, until one that a started block took, or the chain's first tile. It computes them in
// the chain's order, lowest first. A block whose own tile is taken has nothing to do.
// When blocks start in index order, as they do on every GPU tried, a block takes its own
// tile alone (tile t - stride was taken when its block started): block t computes tile t.
// Returns the first tile to compute, or -1 for none.
__device__ int take_tiles(int* taken, int tile, int stride) {
    __shared__ int first;
    if (threadIdx.x == 0) {
        first = -1;
        if (atomicExch(taken + tile, 1) == 0)
            for (first = tile; first >= stride && atomicExch(taken + first - stride, 1) == 0;) first -= stride;
    }
    __syncthreads();
    return first;
}

// One block per (key tile j, batch * head): tile j * BH + bh, computed by block
// j * BH + bh (deterministic mode with chains: see take_tiles). reversed_start (for the
// tests only): block b takes tile gridDim.x - 1 - b, as if the GPU started the blocks in
// reverse order. A kernel per mode, so that the default mode's has neither the flags nor the
// loop, and the deterministic mode's without chains (a buffer per key tile) neither the
// flags nor the counters.
template <bool deterministic, bool chained>
__global__ void __launch_bounds__(THREADS)
backward_kernel(Tensor4<const float> q, Tensor4<const float> k, Tensor4<const float> v,
                Tensor4<const float> dout, const float* __restrict__ L, const float* __restrict__ D,
                Tensor4<float> dq, float* __restrict__ dQ_partial, int* __restrict__ dQ_progress,
                int* __restrict__ dQ_taken, Tensor4<float> dk, Tensor4<float> dv,
                int64_t BH, int Nq, int Nk, int P, float softmax_scale, bool causal,
                bool reversed_start) {
    extern __shared__ __align__(16) float smem[];
    // The block's own tile, the last it computes. Deterministic, the loop reads it from shared
    // memory: a tile's work leaves no register free to hold it (it spilled).
    __shared__ int last;
    const int tile = reversed_start ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    if (chained && threadIdx.x == 0) last = tile;
    const int stride = P * (int)BH;                 // tile - stride: the previous tile of its buffer
    const int first = chained ? take_tiles(dQ_taken, tile, stride) : tile;  // take_tiles syncs
    if (first < 0) return;
    for (int t = first;; t += stride) {             // first, first + stride, ..., tile
        backward_key_tile(q, k, v, dout, L, D, dq, dQ_partial, dQ_progress, dk, dv, BH, Nq, Nk, P,
                          softmax_scale, causal, deterministic, chained, smem, t);
        if (t == (chained ? last : tile)) break;
        __syncthreads();                            // all warps are done with this tile's shared memory
    }
}

// -----------------------------------------------------------------------------
// Launchers
// -----------------------------------------------------------------------------

// With two key tiles or one, an element of dQ receives at most two additions, onto zero,
// and 0 + a + b is 0 + b + a bit for bit: the default mode is deterministic already, and
// the deterministic mode runs it (backward()).
bool default_is_deterministic(int Tc) { return Tc <= 2; }

// How many dQ partial buffers the deterministic backward uses: P = min(Tc, DQ_PARTIALS),
// 1 when causal and Tc <= SINGLE_CHAIN, or when the default mode runs (Tc <= 2). With
// P = 1 the buffer is dq itself.
int dq_partials(int Nk, bool causal) {
    if (Nk == 0) return 0;
    const int Tc = cdiv(Nk, Bc);
    return default_is_deterministic(Tc) || (causal && Tc <= SINGLE_CHAIN) ? 1 : std::min(Tc, DQ_PARTIALS);
}

// Whether key tiles of the deterministic backward wait for one another: where a buffer
// receives more than one key tile (Tc > P), and not where the default mode runs. With
// Tc <= P each key tile stores into a buffer of its own.
bool waits(int Nk, bool causal) {
    const int Tc = cdiv(Nk, Bc);
    return !default_is_deterministic(Tc) && Tc > dq_partials(Nk, causal);
}

// How many ints the deterministic backward needs: where key tiles wait, a counter per warp
// of each tile, then a flag per tile (taken by a block): Tc * BH * (4 + 1); else none.
int64_t dq_progress_ints(int64_t BH, int Nk, bool causal) {
    return waits(Nk, causal) ? cdiv(Nk, Bc) * BH * (WARPS + 1) : 0;
}

constexpr size_t FORWARD_SMEM = 5 * TILE * sizeof(float);              // Q_i; K_j, V_j twice: 85 KB
constexpr size_t BACKWARD_SMEM = (5 * TILE + 2 * Br) * sizeof(float);  // K_j, V_j, dS_ij, Q_i, dO_i; L_i, D_i: 85.5 KB

// A kernel may use more than 48 KB of shared memory once allowed to, on each device: the
// first launch on a device sets the attribute, and the others skip that driver call.
template <auto kernel, size_t bytes>
cudaError_t allow_shared_memory() {
    static std::atomic<uint64_t> allowed{0};  // bit n: done on device n (n < 64)
    int device;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    if (allowed.load(std::memory_order_relaxed) & bit) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (err == cudaSuccess) allowed.fetch_or(bit, std::memory_order_relaxed);
    return err;
}

// kernel<<<blocks, threads, bytes, stream>>>(args...), allowed its `bytes` of shared memory
// first: how Parts II and III launch their kernels.
template <auto kernel, size_t bytes, typename... Args>
cudaError_t launch(int64_t blocks, int threads, cudaStream_t stream, Args... args) {
    if (blocks == 0) return cudaSuccess;
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    const cudaError_t err = allow_shared_memory<kernel, bytes>();
    if (err != cudaSuccess) return err;
    kernel<<<(unsigned)blocks, threads, bytes, stream>>>(args...);
    return cudaGetLastError();
}

cudaError_t forward(In q, In k, In v, Out o, float* L, int64_t BH, int Nq, int Nk, float softmax_scale,
                    bool causal, cudaStream_t stream) {
    return launch<forward_kernel, FORWARD_SMEM>(BH * cdiv(Nq, Br), THREADS, stream, q, k, v, o, L, BH, Nq, Nk,
                                                softmax_scale, causal);
}

// The backward's modes, each a kernel of its own (see backward_kernel).
template <bool deterministic_, bool chained_>
struct Mode { static constexpr bool deterministic = deterministic_, chained = chained_; };

// Default mode: the preprocess zeroes dq, and the kernel adds into it. Deterministic mode: dq
// is partial buffer 0, dq_partial holds buffers 1 .. P-1 ((P - 1) * BH * Nq * d floats,
// P = dq_partials(Nk, causal); unused when P = 1), and dq_progress dq_progress_ints(BH, Nk,
// causal) ints (zeroed by the preprocess; none, and unused, unless waits()). reversed_start,
// for the tests: the blocks take their tiles as if the GPU started them in reverse order.
cudaError_t backward(In dout, In q, In k, In v, In o, const float* L, float* D, Out dq, float* dq_partial,
                     int* dq_progress, Out dk, Out dv, int64_t BH, int Nq, int Nk, float softmax_scale,
                     bool causal, bool deterministic, bool reversed_start, cudaStream_t stream) {
    if (BH == 0 || Nk == 0) return cudaSuccess;
    const int Tc = cdiv(Nk, Bc);
    const int P = dq_partials(Nk, causal);
    if (BH * Tc > INT32_MAX) return cudaErrorInvalidConfiguration;  // before the preprocess runs
    if (default_is_deterministic(Tc)) deterministic = false;
    Out zeroed = dq;
    if (deterministic) zeroed.data = nullptr;
    const bool chained = deterministic && waits(Nk, causal);
    cudaError_t err = tutorial::backward_preprocess(dout, o, D, zeroed, dq_progress,  // lines 3-4
                                                    chained ? dq_progress_ints(BH, Nk, causal) : 0, BH, Nq, stream);
    if (err != cudaSuccess) return err;
    int* dq_taken = chained ? dq_progress + BH * Tc * WARPS : nullptr;
    const auto run = [&](auto mode) {
        return launch<backward_kernel<decltype(mode)::deterministic, decltype(mode)::chained>, BACKWARD_SMEM>(
            BH * Tc, THREADS, stream, q, k, v, dout, L, D, dq, dq_partial, dq_progress, dq_taken, dk, dv, BH, Nq,
            Nk, P, softmax_scale, causal, reversed_start);
    };
    err = chained ? run(Mode<true, true>()) : deterministic ? run(Mode<true, false>()) : run(Mode<false, false>());
    if (err != cudaSuccess || !deterministic) return err;
    return tutorial::sum_dq_partials(dq_partial, dq, BH, Nq, P, Br, causal, stream);
}

}  // namespace fast

// =============================================================================
// Part III. Hopper: warpgroup MMA and a producer warpgroup (kernel="hopper", sm_90a)
// =============================================================================
// The default on H100 and H200. The forward of Part II, on the instructions that these GPUs
// add; the backward is Part II's (a family meets the whole contract: L is the same, so Part
// II's backward takes this forward's O and L). What changes, and why:
//   * Warpgroup MMA. wgmma.mma_async multiplies a 64 x 64 tile with 4 warps (a
//     "warpgroup") in one instruction, reads both operands from shared memory (or A from
//     registers) and runs asynchronously: the warps go on until wgmma.wait_group. mma.sync
//     (Part II) tops out near 320 TFLOP/s of TF32 on an H100; wgmma near 490, so 3xTF32's
//     ceiling moves from about 107 to about 160 TFLOP/s of FP32 products.
//   * The operand layouts. With TF32, wgmma reads A and B "K-major" only: row r of an
//     operand holds the values summed over. S = Q K^T takes Q and K as they are (K = d);
//     O = P V needs V^T (rows = d, K = keys). In shared memory an operand is a grid of "core
//     matrices" (8 rows x 4 floats, 128 contiguous bytes), which a 64-bit descriptor
//     locates (start, and the distances between core matrices along K and along rows).
//   * A producer warpgroup. Part II's warps load, split and compute in turn. Here warpgroup
//     0 only loads K_j, V_j (cp.async) and splits them into their big and small TF32 parts
//     in wgmma's layout, two key tiles ahead at most; warpgroups 1 and 2 (the consumers)
//     each own 64 query rows and only compute. setmaxnreg moves registers from the
//     producer (88 a thread) to the consumers (208): enough for the producer's split loops
//     to unroll, so that its shared-memory loads overlap instead of each waiting its turn.
//     Where the grid of such blocks would leave SMs idle (short rows, few heads), a block
//     has one consumer: twice as many blocks, the same bits.
//   * mbarriers hand the stages over: full[s] completes when the producer has filled stage
//     s, empty[s] when every consumer is done with it. A phase of an mbarrier completes
//     once its expected arrivals have arrived; a waiter names the parity of the phase it
//     waits for, so a stage's k-th use waits for parity k % 2.
//   * The async proxy. wgmma reads shared memory through the "async proxy", which does not
//     see ordinary stores until fence.proxy.async: the producer fences after each split.
//   * NaN containment. Inside a wgmma a hidden key's P = 0 meets its row of V for every
//     query row of the chain, and 0 * NaN is NaN. The producer stages non-finite values
//     of V as 0 and flags the stage; a consumer then adds, row by row, P~ times each
//     non-finite value of the keys its rows see (add_nonfinite_pv), as Part II does.
// Measured (H100, 2026-12-06 and 07, B·H = 16, N = 4096, the forward alone, TFLOP/s of FP32
// products; benchmarks/NOTES.md, v12-v15 and v21, has the runs):
//   1. one warpgroup staging and computing in turn (prototype)     34.3
//   2. a producer warpgroup, two consumers, mbarriers (prototype)  79.2; with strides and NaN
//                                                                  containment 69.8, causal 54.4
//   3. one grid dimension, every head's longest query tiles first  75.1, causal 73.9
//      (the prototype went head by head)                           (Part II: 56.1 and 53.6)
//   4. the producer's split loops unrolled, 88 registers           89.3, causal 86.6
//      for it and 208 for the consumers (was 40 and 232, 73.9 and 73.1 in the same run;
//      the registers alone: 76.3 and 75.6)
//   5. as here: blocks of one consumer where they all fit the SMs at once: N = 512 from 30.4
//      to 38.8, causal 15.9 to 19.7; N = 4096 keeps two consumers (2026-12-07, v24)
//   Tried and not kept: tile j + 1's S chain issued before tile j's softmax (-18%: its
//   accumulators stay live through the softmax); the two consumers issuing in turns,
//   FlashAttention-3's ping-pong (+2%, then -0.3% after step 4); masks only on the tiles
//   that need them (+0.3%); each row of K_j and V_j fetched by one cp.async.bulk into an
//   mbarrier (-27%: the copy engine serves 128 requests of 256 bytes a tile one after
//   another; a bulk copy pays per request); K_j and V_j as four TMA boxes a tile, swizzled
//   (-8%, H200); the producer splitting K_j from global memory rather than from a raw tile
//   (-43%), V_j too (-72%), or K_j copied by cp.async straight into wgmma's layout (-11%):
//   the producer then waits on global memory between its splits.
namespace hopper {

// A block is the producer warpgroup and CONSUMERS consumer warpgroups of 64 query rows each:
// two where the grid fills the SMs, one for short rows and few heads (see forward()).
constexpr int Bc = 64;                         // key rows of a tile
constexpr int TILE = 64 * 64;                  // floats of one split part of a tile (no padding)
constexpr int threads(int consumers) { return 128 * (1 + consumers); }
constexpr size_t smem_bytes(int consumers) {
    return (2 * consumers + 2 * 4) * TILE * sizeof(float)  // Q per consumer; 2 stages of K, V^T
           + 2 * fast::TILE * sizeof(float)                 // raw K_j, V_j, as Part II's tiles
           + 4 * sizeof(uint64_t)                           // mbarriers: full[2], empty[2]
           + 2 * sizeof(int);                               // nonfinite_v[2]: 226 KB with 2 consumers
}
static_assert(Bc == 64 && d == 64, "a tile product is 8 wgmma m64n64k8");
static_assert(fast::THREADS == 128, "the producer warpgroup loads raw tiles as Part II's block does");

#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)  // the device code: sm_90a only

// --- operand layouts -----------------------------------------------------------------------
// A 64 x 64 operand (rows x K) in shared memory: core matrix (row group r / 8, K group k / 4)
// at (k / 4 * 8 + r / 8) * 128 bytes, so the 8 core matrices of one K group are adjacent:
// 128 bytes between row groups ("stride", SBO), 1 KB between K groups ("leading", LBO).
__device__ __forceinline__ int element_at(int r, int k) { return ((k / 4) * 8 + r / 8) * 32 + (r % 8) * 4 + k % 4; }
// The descriptor of k-step s (K columns 8s .. 8s + 7) of a tile: start address, LBO and SBO
// in units of 16 bytes (bits 0-13, 16-29, 32-45); no swizzle.
__device__ __forceinline__ uint64_t tile_step(const float* tile, int s) {
    const uint64_t start = (fast::smem_addr(tile + element_at(0, 8 * s)) & 0x3FFFF) >> 4;
    return start | uint64_t(1024 >> 4) << 16 | uint64_t(128 >> 4) << 32;
}

// --- wgmma ---------------------------------------------------------------------------------
// The accumulator of D (64 x 64) in a warpgroup is Part II's, per warp: warp w holds rows
// 16w .. 16w + 15; lane (g, t) holds d[4n .. 4n + 3] = D[16w + g][8n + 2t], D[16w + g][8n + 2t + 1],
// D[16w + g + 8][8n + 2t], D[16w + g + 8][8n + 2t + 1]. accumulate = 0 overwrites D.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#define FLASH_D32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
                  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FLASH_D32_OPERANDS(d)                                                                              \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),  \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
// D += A B^T (64 x 64 x 8), A and B from shared memory.
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 " FLASH_D32 ", %32, %33, p, 1, 1;\n}\n"
                 : FLASH_D32_OPERANDS(d) : "l"(a), "l"(b), "r"(accumulate));
}
// D += A B^T, A from registers (per warp, mma.sync m16n8k8's A fragment), B from shared memory.
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 " FLASH_D32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
                 : FLASH_D32_OPERANDS(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
#undef FLASH_D32
#undef FLASH_D32_OPERANDS

// --- mbarriers, named barriers, registers --------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(fast::smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(fast::smem_addr(bar))
                 : "memory");
}
// Returns once the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(fast::smem_addr(bar)), "r"(parity) : "memory");
    } while (!done);
}
// A barrier for the 128 threads of one warpgroup (named barrier `id`; 0 is __syncthreads').
template <int id>
__device__ __forceinline__ void warpgroup_sync() { asm volatile("bar.sync %0, 128;\n" ::"n"(id) : "memory"); }
// Whether any thread of warpgroup barrier `id` passes true (a barrier too).
template <int id>
__device__ __forceinline__ bool warpgroup_any(bool x) {
    uint32_t any;
    asm volatile("{\n.reg .pred p, q;\nsetp.ne.u32 q, %1, 0;\nbar.red.or.pred p, %2, 128, q;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(any) : "r"((uint32_t)x), "n"(id) : "memory");
    return any;
}
// Registers per thread from here on (the kernel starts every thread at 168, 65536 / 384
// rounded down to a multiple of 8): the producer gives back what the consumers take, and
// they can take no more, as setmaxnreg.inc waits until the block has the registers.
template <int registers>
__device__ __forceinline__ void registers_down() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(registers));
}
template <int registers>
__device__ __forceinline__ void registers_up() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(registers));
}

// --- staging: tiles into wgmma's layout, split (tid: the thread's index in its warpgroup) --

// Splits x (Part II's split, big's ignored low bits cleared) and stores the parts at
// elements (r, k .. k + 3) of two 64 x 64 operands (k a multiple of 4: one row of a core matrix).
__device__ __forceinline__ void store_split4(float* big, float* small, int r, int k, float4 x) {
    uint32_t b[4], s[4];
    fast::split(x.x, b[0], s[0]);
    fast::split(x.y, b[1], s[1]);
    fast::split(x.z, b[2], s[2]);
    fast::split(x.w, b[3], s[3]);
    const int at = element_at(r, k);
    *reinterpret_cast<uint4*>(big + at) =
        make_uint4(b[0] & 0xffffe000u, b[1] & 0xffffe000u, b[2] & 0xffffe000u, b[3] & 0xffffe000u);
    *reinterpret_cast<uint4*>(small + at) = make_uint4(s[0], s[1], s[2], s[3]);
}
// Rows row0 .. row0 + 63 of src (zeros past N) as an operand with d as K; each 8 lanes store
// one core matrix. From global memory (Q_i), or from a raw tile (K_j).
__device__ __forceinline__ void stage_rows(float* big, float* small, Rows<const float> src, int row0, int N, int tid) {
#pragma unroll
    for (int f = tid; f < 64 * 16; f += 128) {
        const int r = 8 * (f / 128) + f % 8, c = f / 8 % 16;  // row r, floats 4c .. 4c + 3
        const float4 x = row0 + r < N ? *reinterpret_cast<const float4*>(src[row0 + r] + 4 * c)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
        store_split4(big, small, r, 4 * c, x);
    }
}
// P's accumulator fragment holds keys 8s + 2t and 8s + 2t + 1 where wgmma's A fragment has
// k = t and t + 4 (see p_fragment). So V_j^T keeps the keys of each 8 in that order (key 2u
// at position u, key 2u + 1 at position u + 4), and P feeds the product as it is, the trick
// of Part II's mma.sync.
__device__ __forceinline__ int key_at(int position) {
    const int u = position % 8;
    return (position & ~7) | (u < 4 ? 2 * u : 2 * (u - 4) + 1);
}
// x, or 0 where x is a NaN or an infinity (then `found` is set).
__device__ __forceinline__ float finite_or_zero(float x, bool& found) {
    found |= !isfinite(x);
    return isfinite(x) ? x : 0.f;
}
// V_j^T from a raw tile: rows = d, K = keys in key_at's order; a thread gathers 4 keys of
// one column into one row of a core matrix. NaN and Inf are staged as 0; returns whether
// this thread met one.
__device__ __forceinline__ bool split_transposed(float* big, float* small, const float* raw, int tid) {
    bool found = false;
#pragma unroll
    for (int f = tid; f < 64 * 16; f += 128) {
        const int n = f % 64, position = 4 * (f / 64);
        const float4 x = make_float4(finite_or_zero(raw[fast::at(key_at(position), n)], found),
                                     finite_or_zero(raw[fast::at(key_at(position + 1), n)], found),
                                     finite_or_zero(raw[fast::at(key_at(position + 2), n)], found),
                                     finite_or_zero(raw[fast::at(key_at(position + 3), n)], found));
        store_split4(big, small, n, position, x);
    }
    return found;
}

// --- one tile: lines 8-10 of Algorithm 1 for a consumer's 64 query rows ----------------------

// A consumer's running state (line 5): lane (g, t) of warp w holds rows 16w + g and
// 16w + g + 8 of O_i (the accumulator fragment), their running max (base 2) and its share
// of their sums.
struct RowState {
    float O[32], m[2], l[2];
};
struct SplitTiles { const float *Q_big, *Q_small, *K_big, *K_small, *Vt_big, *Vt_small; };

// Line 8, issued: S_ij = Q_i K_j^T, the small cross terms first (Part II's order); the
// products run until wgmma_wait_all.
__device__ __forceinline__ void issue_scores(float (&S)[32], const SplitTiles& x) {
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_ss(S, tile_step(x.Q_small, s), tile_step(x.K_big, s), s > 0);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_ss(S, tile_step(x.Q_big, s), tile_step(x.K_small, s), 1);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_ss(S, tile_step(x.Q_big, s), tile_step(x.K_big, s), 1);
    wgmma_commit();
}

// Line 9: scale (base 2), mask, online softmax for key tile j; S becomes P~ in place.
__device__ __forceinline__ void online_softmax(RowState& st, float (&S)[32], int row0, int j, int Nk, bool causal,
                                               float scale_log2) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + 16 * w + g + 8 * h;
        float row_max = st.m[h];
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = j * Bc + 8 * n + 2 * t + e;
                float& s = S[4 * n + 2 * h + e];
                s = masked(row, key, Nk, causal) ? -INFINITY : s * scale_log2;
                row_max = fmaxf(row_max, s);
            }
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
        row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
        const float alpha = fast::exp2_approx(st.m[h] - row_max);
        st.m[h] = row_max;
        st.l[h] *= alpha;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float& s = S[4 * n + 2 * h + e];
                s = fast::exp2_approx(s - row_max);
                st.l[h] += s;
                st.O[4 * n + 2 * h + e] *= alpha;
            }
    }
}

// wgmma's A fragment of P~ for k-step s (keys 8s .. 8s + 7), split: lane (g, t) has
// P[g][8s + 2t], P[g][8s + 2t + 1], P[g + 8][8s + 2t], P[g + 8][8s + 2t + 1] in S[4s .. 4s + 3],
// and A wants (g, k = t), (g + 8, t), (g, t + 4), (g + 8, t + 4): with V^T's keys in
// key_at's order, the same values.
__device__ __forceinline__ void split_p(uint32_t (&P_big)[8][4], uint32_t (&P_small)[8][4], const float (&S)[32]) {
#pragma unroll
    for (int s = 0; s < 8; ++s) {
        const float p[4] = {S[4 * s], S[4 * s + 2], S[4 * s + 1], S[4 * s + 3]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            fast::split(p[e], P_big[s][e], P_small[s][e]);
            P_big[s][e] &= 0xffffe000u;
        }
    }
}

// Line 10, issued: pv = P~_ij V_j, added to O_i in FP32 once done (Part II's staging);
// P_big, P_small must stay untouched until wgmma_wait_all.
__device__ __forceinline__ void issue_pv(float (&pv)[32], const uint32_t (&P_big)[8][4],
                                         const uint32_t (&P_small)[8][4], const SplitTiles& x) {
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_rs(pv, P_small[s], tile_step(x.Vt_big, s), s > 0);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_rs(pv, P_big[s], tile_step(x.Vt_small, s), 1);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_rs(pv, P_big[s], tile_step(x.Vt_big, s), 1);
    wgmma_commit();
}

// The rare path of line 10, for a tile whose V held a NaN or Inf (staged as 0): each row
// adds P~ times the non-finite values of the keys it sees, read from V in global memory.
// P~ comes from the row's quad: lane t holds keys 8n + 2t and 8n + 2t + 1.
__device__ __forceinline__ void add_nonfinite_pv(RowState& st, const float (&S)[32], Rows<const float> V, int row0,
                                                   int j, int Nk, bool causal) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4, lane = threadIdx.x % 32;
    for (int owner = 0; owner < 4; ++owner)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = j * Bc + 8 * n + 2 * owner + e;
                float p[2];
                bool sees[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    p[h] = __shfl_sync(0xffffffffu, S[4 * n + 2 * h + e], (lane & ~3) | owner);
                    sees[h] = !masked(row0 + 16 * w + g + 8 * h, key, Nk, causal);
                }
                if (!sees[0] && !sees[1]) continue;
#pragma unroll
                for (int c = 0; c < 16; ++c) {  // the thread's columns 8 (c / 2) + 2t + c % 2
                    const float x = V[key][8 * (c / 2) + 2 * t + c % 2];
                    if (isfinite(x)) continue;
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        if (sees[h]) st.O[4 * (c / 2) + 2 * h + c % 2] += p[h] * x;
                }
            }
}

// Lines 8-10 for key tile j and the consumer's rows row0 .. row0 + 63; its wgmma are done
// on return.
__device__ __forceinline__ void attend(RowState& st, const SplitTiles& x, int row0, int j, int Nk, bool causal,
                                       float scale_log2, bool nonfinite_v, Rows<const float> V) {
    float S[32], pv[32];
    uint32_t P_big[8][4], P_small[8][4];
    issue_scores(S, x);
    wgmma_wait_all();
    online_softmax(st, S, row0, j, Nk, causal, scale_log2);
    split_p(P_big, P_small, S);
    issue_pv(pv, P_big, P_small, x);
    wgmma_wait_all();
#pragma unroll
    for (int e = 0; e < 32; ++e) st.O[e] += pv[e];
    if (nonfinite_v) add_nonfinite_pv(st, S, V, row0, j, Nk, causal);
}

// Lines 12-15: O_i / l_i and L_i for rows row0 .. row0 + 63 (those below Nq).
__device__ __forceinline__ void write_rows(const RowState& st, Rows<float> O, float* L, int row0, int Nq) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l_row = st.l[h] + __shfl_xor_sync(0xffffffffu, st.l[h], 1);
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = row0 + 16 * w + g + 8 * h;
        if (row >= Nq) continue;
        const float inv_l = 1.f / l_row;
#pragma unroll
        for (int n = 0; n < 8; ++n)
            *reinterpret_cast<float2*>(O[row] + 8 * n + 2 * t) =
                make_float2(st.O[4 * n + 2 * h] * inv_l, st.O[4 * n + 2 * h + 1] * inv_l);
        if (t == 0) L[row] = st.m[h] / fast::LOG2E + logf(l_row);
    }
}

// The key tiles that rows row0 .. row0 + rows - 1 need (causal: up to the diagonal); 0 if
// none of them is below Nq.
__device__ __forceinline__ int key_tiles(int row0, int rows, int Nq, int Nk, bool causal) {
    if (row0 >= Nq) return 0;
    const int last_row = min(row0 + rows, Nq) - 1;
    return causal ? min(cdiv(Nk, Bc), last_row / Bc + 1) : cdiv(Nk, Bc);
}

#endif  // the device code

// -----------------------------------------------------------------------------
// Forward: Algorithm 1 with a producer warpgroup and one or two consumers
// -----------------------------------------------------------------------------
// One block per (query tile i of Br = 64 * CONSUMERS rows, batch * head), the last query
// tiles first. Warpgroup 0 stages key tile j into stage j % 2; consumer c computes rows
// Br i + 64c .. Br i + 64c + 63. full[s]: the stage holds its tile (128 producer arrivals);
// empty[s]: every consumer is done with it (128 arrivals each). A consumer waits on full[s]
// and arrives on empty[s] for every tile of the block, its own or not (causal: consumer 0
// sees one key tile fewer), so that no arrival runs a phase ahead.
//   line 4  (load Q_i)                 : each consumer stages its 64 rows, split
//   line 5  (O_i = 0, l_i = 0, m_i = -inf): RowState in registers
//   line 6  (for j)                    : the producer's loop and, in step, the consumers'
//   line 7  (load K_j, V_j)            : the producer: cp.async, split into stage j % 2
//   lines 8-10                         : attend(): wgmma, online softmax, wgmma
//   lines 12-15 (O_i / l_i, L_i)       : write_rows()
// Both instantiations are compiled for 384 threads, so that every thread starts at 168
// registers, the count setmaxnreg moves from.
template <int CONSUMERS>
__global__ void __launch_bounds__(threads(2), 1)
forward_kernel(Tensor4<const float> q, Tensor4<const float> k, Tensor4<const float> v, Tensor4<float> o, float* L,
               int64_t BH, int Nq, int Nk, float softmax_scale, bool causal) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int Br = 64 * CONSUMERS;  // query rows of a block
    extern __shared__ __align__(128) float smem[];
    float* stages = smem + 2 * CONSUMERS * TILE;  // stage s: K_big, K_small, Vt_big, Vt_small
    float* raw_K = stages + 2 * 4 * TILE;
    float* raw_V = raw_K + fast::TILE;
    uint64_t* full = reinterpret_cast<uint64_t*>(raw_V + fast::TILE);
    uint64_t* empty = full + 2;
    int* nonfinite_v = reinterpret_cast<int*>(empty + 2);  // stage s's V held a NaN or Inf
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
    const int i = cdiv(Nq, Br) - 1 - (int)(blockIdx.x / BH);  // the grid is below 2^31 blocks
    const int64_t bh = blockIdx.x % BH;
    const int block_row0 = i * Br;
    const Rows<const float> Q = q.head(bh), K = k.head(bh), V = v.head(bh);
    const int Tc_block = key_tiles(block_row0, Br, Nq, Nk, causal);
    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; ++s) {
            mbar_init(&full[s], 128);
            mbar_init(&empty[s], 128 * CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {  // the producer: line 7 for every key tile, two stages ahead at most
        registers_down<88>();
        fast::load_tile_async(raw_K, K, 0, Nk);
        fast::load_tile_async(raw_V, V, 0, Nk);
        fast::cp_async_commit();
        for (int j = 0; j < Tc_block; ++j) {
            const int s = j % 2;
            float* stage = stages + 4 * s * TILE;
            fast::cp_async_wait_all();
            warpgroup_sync<1>();                      // raw tile j landed, for every producer thread
            mbar_wait(&empty[s], (j / 2 + 1) % 2);    // the consumers are done with tile j - 2
            stage_rows(stage, stage + TILE, Rows<const float>{raw_K, fast::STRIDE}, 0, Bc, tid);
            const bool found = split_transposed(stage + 2 * TILE, stage + 3 * TILE, raw_V, tid);
            const bool any = warpgroup_any<1>(found);
            if (tid == 0) nonfinite_v[s] = any;
            fence_proxy_async();                      // the split tiles, visible to wgmma
            mbar_arrive(&full[s]);
            warpgroup_sync<1>();                      // every producer thread is done with the raw tile
            if (j + 1 < Tc_block) {
                fast::load_tile_async(raw_K, K, (j + 1) * Bc, Nk);
                fast::load_tile_async(raw_V, V, (j + 1) * Bc, Nk);
                fast::cp_async_commit();
            }
        }
    } else {  // consumer c: lines 4-15 for its 64 query rows
        registers_up<208>();  // 128 x 88 + 256 x 208 = 384 x 168, what the block started with
        const int c = wg - 1, row0 = block_row0 + 64 * c;
        float* Q_big = smem + 2 * c * TILE;
        stage_rows(Q_big, Q_big + TILE, Q, row0, Nq, tid);  // line 4
        fence_proxy_async();
        if (c == 0) warpgroup_sync<2>();
        else warpgroup_sync<3>();
        RowState st;                                         // line 5
#pragma unroll
        for (int e = 0; e < 32; ++e) st.O[e] = 0.f;
        st.m[0] = st.m[1] = -INFINITY;
        st.l[0] = st.l[1] = 0.f;
        const int Tc_rows = key_tiles(row0, 64, Nq, Nk, causal);
        for (int j = 0; j < Tc_block; ++j) {                 // line 6, in step with the producer
            const int s = j % 2;
            float* stage = stages + 4 * s * TILE;
            mbar_wait(&full[s], (j / 2) % 2);
            if (j < Tc_rows)                                 // lines 8-10
                attend(st, SplitTiles{Q_big, Q_big + TILE, stage, stage + TILE, stage + 2 * TILE, stage + 3 * TILE},
                       row0, j, Nk, causal, softmax_scale * fast::LOG2E, nonfinite_v[s], V);
            mbar_arrive(&empty[s]);
        }
        if (row0 < Nq) write_rows(st, o.head(bh), L + bh * Nq, row0, Nq);  // lines 12-15
    }
#endif
}

// -----------------------------------------------------------------------------
// Launcher
// -----------------------------------------------------------------------------

// Whether this build holds Part III's code (compiled for sm_90a: FLASH_ATTENTION_SM90A, set
// by the build where it targets Hopper) and the current GPU runs it (compute capability 9.0).
bool available() {
#ifdef FLASH_ATTENTION_SM90A
    int device, major = 0, minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess) return false;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return major == 9 && minor == 0;
#else
    return false;
#endif
}

template <int CONSUMERS>
cudaError_t launch(In q, In k, In v, Out o, float* L, int64_t BH, int Nq, int Nk, float softmax_scale, bool causal,
                   cudaStream_t stream) {
    return fast::launch<forward_kernel<CONSUMERS>, smem_bytes(CONSUMERS)>(
        BH * cdiv(Nq, 64 * CONSUMERS), threads(CONSUMERS), stream, q, k, v, o, L, BH, Nq, Nk, softmax_scale, causal);
}

// Blocks of 128 query rows, unless twice as many blocks of 64 still fit the SMs at once (short
// rows, few heads): then 64, which keeps more SMs busy. A row's arithmetic is the same in
// both, so the output does not depend on the choice (nor on the GPU's SM count).
cudaError_t forward(In q, In k, In v, Out o, float* L, int64_t BH, int Nq, int Nk, float softmax_scale,
                    bool causal, cudaStream_t stream) {
    int device, sms;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    return BH * cdiv(Nq, 64) <= sms ? launch<1>(q, k, v, o, L, BH, Nq, Nk, softmax_scale, causal, stream)
                                    : launch<2>(q, k, v, o, L, BH, Nq, Nk, softmax_scale, causal, stream);
}

}  // namespace hopper

// =============================================================================
// Dispatch: the kernel family the caller chose (plain CUDA: pointers in, error code out)
// =============================================================================

// Part III's family runs its own forward and Part II's backward.
enum class Kernel { fast, tutorial, hopper };

// How many dQ partial buffers the deterministic backward uses (each part says why).
int dq_partials(int Nk, Kernel kernel, bool causal) {
    return kernel == Kernel::tutorial ? tutorial::dq_partials(Nk) : fast::dq_partials(Nk, causal);
}

// How many ints the deterministic backward needs besides the buffers (Part I: none).
int64_t dq_progress_ints(int64_t BH, int Nk, Kernel kernel, bool causal) {
    return kernel == Kernel::tutorial ? 0 : fast::dq_progress_ints(BH, Nk, causal);
}

cudaError_t forward(In q, In k, In v, Out o, float* L, int64_t BH, int Nq, int Nk, float softmax_scale,
                    bool causal, Kernel kernel, cudaStream_t stream) {
    switch (kernel) {
        case Kernel::tutorial: return tutorial::forward(q, k, v, o, L, BH, Nq, Nk, softmax_scale, causal, stream);
        case Kernel::hopper: return hopper::forward(q, k, v, o, L, BH, Nq, Nk, softmax_scale, causal, stream);
        default: return fast::forward(q, k, v, o, L, BH, Nq, Nk, softmax_scale, causal, stream);
    }
}

// dq_progress: dq_progress_ints(BH, Nk, kernel, causal) ints; reversed_start: see fast::backward.
cudaError_t backward(In dout, In q, In k, In v, In o, const float* L, float* D, Out dq, float* dq_partial,
                     int* dq_progress, Out dk, Out dv, int64_t BH, int Nq, int Nk, float softmax_scale,
                     bool causal, bool deterministic, Kernel kernel, cudaStream_t stream,
                     bool reversed_start = false) {
    if (kernel == Kernel::tutorial)
        return tutorial::backward(dout, q, k, v, o, L, D, dq, dq_partial, dk, dv, BH, Nq, Nk, softmax_scale,
                                  causal, deterministic, stream);
    return fast::backward(dout, q, k, v, o, L, D, dq, dq_partial, dq_progress, dk, dv, BH, Nq, Nk,
                          softmax_scale, causal, deterministic, reversed_start, stream);
}

}  // namespace flash

// -----------------------------------------------------------------------------
// PyTorch binding (compiled with -DFLASH_ATTENTION_WITH_TORCH)
// -----------------------------------------------------------------------------
// flash_attention.py validates what users pass and declares the torch.library ops; this
// module registers their CUDA kernels, and the autograd of `attention` on CUDA: a call of
// flash_attention() on CUDA tensors then runs no Python after its checks, forward or
// backward (on the CPU, flash_attention.py's _FlashAttentionFunction does the same with the
// reference). The checks below guard this module's own contract with its Python caller.
#ifdef FLASH_ATTENTION_WITH_TORCH
#include <torch/extension.h>
#include <torch/library.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

void check_tensor(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& q) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
    TORCH_CHECK(t.device() == q.device(), name, " must be on q's device, ", q.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

// The stride the kernels use for dimension `dim` of t: 0 for a dimension of size 1, whose
// stride is never used and may be anything.
int64_t stride(const at::Tensor& t, int dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

// Whether the kernels can read a (B, H, N, 64) tensor where it is: its rows of 64 floats are
// contiguous and start 16-byte aligned (the data pointer and the strides of batch, head and
// row multiples of 4 floats), and a row stride fits in an int.
bool readable_in_place(const at::Tensor& t) {
    if (t.size(3) != flash::d || t.stride(3) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0)
        return false;
    for (int dim = 0; dim < 3; ++dim)
        if (stride(t, dim) % 4 != 0) return false;
    return stride(t, 2) <= INT32_MAX;
}

// t itself if the kernels can read it in place, else a copy that they can. A broadcast
// dimension (stride 0) stays broadcast in the copy: an expanded dout costs one row.
at::Tensor readable(const at::Tensor& t) {
    if (readable_in_place(t)) return t;
    at::Tensor rows = t;
    for (int dim = 0; dim < 3; ++dim)
        if (t.stride(dim) == 0 && t.size(dim) > 1) rows = rows.narrow(dim, 0, 1);
    rows = rows.contiguous();
    if (reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 != 0) rows = rows.clone();
    return rows.expand(t.sizes());
}

// An output (O, or a gradient) for the input t, in t's order of dimensions when t's rows are
// contiguous (empty_like: the same strides if t is dense, else dense in t's order), so that
// the views and splits around the attention stay views in autograd; contiguous otherwise.
// flash_attention.py's _output_like is the same rule (the CPU path and torch.compile).
at::Tensor output_like(const at::Tensor& t) {
    at::Tensor out = t.stride(3) == 1 ? at::empty_like(t) : at::empty(t.sizes(), t.options());
    TORCH_INTERNAL_ASSERT(readable_in_place(out), "an output the kernels cannot write: strides ", out.strides());
    return out;
}

template <typename T>
flash::Tensor4<T> strided(const at::Tensor& t) {
    return {t.data_ptr<float>(), stride(t, 0), stride(t, 1), (int)stride(t, 2), (int)t.size(1)};
}

flash::Kernel kernel_named(c10::string_view name) {
    TORCH_CHECK(name == "fast" || name == "tutorial" || name == "hopper",
                "kernel must be \"fast\", \"tutorial\" or \"hopper\", got \"", name, "\"");
    return name == "fast" ? flash::Kernel::fast : name == "tutorial" ? flash::Kernel::tutorial : flash::Kernel::hopper;
}

// flash_attention::forward on CUDA: O and L.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           bool causal, double softmax_scale, c10::string_view kernel) {
    check_tensor(q, "q", 4, q);
    check_tensor(k, "k", 4, q);
    check_tensor(v, "v", 4, q);
    TORCH_CHECK(q.size(3) == flash::d && k.sizes() == v.sizes() &&
                    q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.size(3) == flash::d,
                "q (B, H, Nq, 64), k and v (B, H, Nk, 64) expected");
    const flash::Kernel which = kernel_named(kernel);
    const c10::cuda::CUDAGuard guard(q.device());
    if (which == flash::Kernel::hopper && !flash::hopper::available()) {
        const cudaDeviceProp* gpu = at::cuda::getCurrentDeviceProperties();
        TORCH_CHECK(false, "flash_attention: kernel=\"hopper\" runs on GPUs of compute capability 9.0 (H100, H200), "
                    "with the kernels built for sm_90a (the build does so where it targets such a GPU); ",
                    q.device(), " is ", gpu->name, " (", gpu->major, ".", gpu->minor,
                    gpu->major == 9 && gpu->minor == 0 ? ") but these kernels were built without sm_90a" : ")");
    }
    auto o = output_like(q);
    auto L = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
    C10_CUDA_CHECK(flash::forward(strided<const float>(readable(q)), strided<const float>(readable(k)),
                                  strided<const float>(readable(v)), strided<float>(o), L.data_ptr<float>(),
                                  q.size(0) * q.size(1), q.size(2), k.size(2), (float)softmax_scale, causal,
                                  which, at::cuda::getCurrentCUDAStream()));
    return {o, L};
}

// flash_attention::backward on CUDA: dq, dk, dv. reversed_start (the tests', through the
// Python module only): the fast deterministic backward's blocks take their tiles as if the
// GPU started them in reverse order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
        const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
        const at::Tensor& L, bool causal, double softmax_scale, bool deterministic, c10::string_view kernel,
        bool reversed_start = false) {
    check_tensor(q, "q", 4, q);
    check_tensor(dout, "dout", 4, q);
    check_tensor(k, "k", 4, q);
    check_tensor(v, "v", 4, q);
    check_tensor(out, "out", 4, q);
    check_tensor(L, "L", 3, q);
    TORCH_CHECK(q.size(3) == flash::d && dout.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                    k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
                    k.size(3) == flash::d && L.sizes() == q.sizes().slice(0, 3),
                "q, dout, out (B, H, Nq, 64), k and v (B, H, Nk, 64), L (B, H, Nq) expected");
    const flash::Kernel which = kernel_named(kernel);
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t BH = q.size(0) * q.size(1);
    const int Nq = q.size(2), Nk = k.size(2);
    auto dq = output_like(q), dk = output_like(k), dv = output_like(v);
    auto D = at::empty_like(L, at::MemoryFormat::Contiguous);
    at::Tensor dq_partial, dq_progress;  // deterministic mode: partial buffers 1 .. P-1 (0 is dq)
    if (deterministic) {
        const int P = flash::dq_partials(Nk, which, causal);
        dq_partial = at::empty({std::max(P - 1, 0) * dq.numel()}, q.options());  // P = 0 if Nk = 0
        dq_progress = at::empty({flash::dq_progress_ints(BH, Nk, which, causal)}, q.options().dtype(at::kInt));
    }
    C10_CUDA_CHECK(flash::backward(
        strided<const float>(readable(dout)), strided<const float>(readable(q)), strided<const float>(readable(k)),
        strided<const float>(readable(v)), strided<const float>(readable(out)), L.contiguous().data_ptr<float>(),
        D.data_ptr<float>(), strided<float>(dq), deterministic ? dq_partial.data_ptr<float>() : nullptr,
        deterministic ? dq_progress.data_ptr<int>() : nullptr, strided<float>(dk), strided<float>(dv), BH, Nq, Nk,
        (float)softmax_scale, causal, deterministic, which, at::cuda::getCurrentCUDAStream(), reversed_start));
    return {dq, dk, dv};
}

// The ops, called through the dispatcher, so that torch.compile traces them.
std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              bool causal, double softmax_scale, c10::string_view kernel) {
    static const auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("flash_attention::forward", "")
        .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                  double, c10::string_view)>();
    return op.call(q, k, v, causal, softmax_scale, kernel);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
        const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
        const at::Tensor& L, bool causal, double softmax_scale, bool deterministic, c10::string_view kernel) {
    static const auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("flash_attention::backward", "")
        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, bool, double, bool, c10::string_view)>();
    return op.call(dout, q, k, v, out, L, causal, softmax_scale, deterministic, kernel);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Passes dq, dk, dv through, and raises if anything differentiates them: the backward op is
// not differentiable, so without this the gradients taken with create_graph=True would not
// depend on q, k, v, dout, and a loss built from them (a gradient penalty) would silently
// lose its second-order term. dout, q, k, v make the gradients require grad exactly when
// the true ones would. (flash_attention.py's _NoDoubleBackward, for the CPU.)
struct NoDoubleBackward : torch::autograd::Function<NoDoubleBackward> {
    static variable_list forward(AutogradContext*, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
        return {dq, dk, dv};
    }
    static variable_list backward(AutogradContext*, variable_list) {
        TORCH_CHECK(false, "flash_attention: double backward is not supported: the gradients of flash_attention were "
                    "differentiated again (torch.autograd.grad(..., create_graph=True), then a backward through them, "
                    "as a gradient penalty does). Use PyTorch's attention for that loss, e.g. "
                    "torch.nn.functional.scaled_dot_product_attention with the math backend.");
    }
};

// flash_attention::attention on CUDA with autograd: the forward op saves O and L, the
// backward op recomputes P from them.
struct Attention : torch::autograd::Function<Attention> {
    static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              bool causal, double softmax_scale, bool deterministic, const std::string& kernel) {
        auto [out, L] = forward_op(q, k, v, causal, softmax_scale, kernel);
        ctx->save_for_backward({q, k, v, out, L});
        ctx->saved_data["causal"] = causal;
        ctx->saved_data["softmax_scale"] = softmax_scale;
        ctx->saved_data["deterministic"] = deterministic;
        ctx->saved_data["kernel"] = kernel;
        return out;
    }
    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &dout = grads[0], &q = saved[0], &k = saved[1], &v = saved[2];
        auto [dq, dk, dv] = backward_op(dout, q, k, v, saved[3], saved[4], ctx->saved_data["causal"].toBool(),
                                        ctx->saved_data["softmax_scale"].toDouble(),
                                        ctx->saved_data["deterministic"].toBool(),
                                        ctx->saved_data["kernel"].toStringRef());
        variable_list out = {dq, dk, dv};
        if (torch::autograd::GradMode::is_enabled())  // create_graph=True: someone may differentiate them
            out = NoDoubleBackward::apply(dq, dk, dv, dout, q, k, v);
        return {out[0], out[1], out[2], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
};

// With no graph to record (no_grad, or no input that requires grad) and no forward-mode
// tangents (which Attention::apply refuses), the forward op alone: Attention::apply would
// cost a few microseconds a call for nothing.
at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                              double softmax_scale, bool deterministic, c10::string_view kernel) {
    using torch::autograd::isFwGradDefined;
    if (!torch::autograd::compute_requires_grad(q, k, v) && !isFwGradDefined(q) && !isFwGradDefined(k) &&
        !isFwGradDefined(v)) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        return std::get<0>(forward_op(q, k, v, causal, softmax_scale, kernel));
    }
    return Attention::apply(q, k, v, causal, softmax_scale, deterministic, std::string(kernel));
}
// Without autograd (inference mode), the output alone.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     double softmax_scale, bool, c10::string_view kernel) {
    return std::get<0>(forward(q, k, v, causal, softmax_scale, kernel));
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attention, CUDA, m) {
    m.impl("forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                         double softmax_scale, c10::string_view kernel) {
        return forward(q, k, v, causal, softmax_scale, kernel);
    });
    m.impl("backward", [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& L, bool causal, double softmax_scale,
                          bool deterministic, c10::string_view kernel) {
        return backward(dout, q, k, v, out, L, causal, softmax_scale, deterministic, kernel);
    });
    m.impl("attention", &attention);
}

TORCH_LIBRARY_IMPL(flash_attention, AutogradCUDA, m) {
    m.impl("attention", &attention_autograd);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "CUDA kernels of flash_attention.py (see flash_attention.cu); importing it registers the CUDA "
              "kernels of the flash_attention ops";
    m.def("forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                        double softmax_scale, const std::string& kernel) {
        return forward(q, k, v, causal, softmax_scale, kernel);
    }, "O, L = forward(q, k, v, causal, softmax_scale, kernel)");
    m.def("backward", [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& L, bool causal, double softmax_scale,
                         bool deterministic, const std::string& kernel, bool reversed_start) {
        return backward(dout, q, k, v, out, L, causal, softmax_scale, deterministic, kernel, reversed_start);
    }, "dq, dk, dv = backward(dout, q, k, v, out, L, causal, softmax_scale, deterministic, kernel, "
       "reversed_start=False); reversed_start (tests only): the fast deterministic backward's "
       "blocks take their tiles as if the GPU started them in reverse order",
          py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("L"),
          py::arg("causal"), py::arg("softmax_scale"), py::arg("deterministic"), py::arg("kernel"),
          py::arg("reversed_start") = false);
    m.def("hopper_available", [](int device) {
        const c10::cuda::CUDAGuard guard((c10::DeviceIndex)device);
        return flash::hopper::available();
    }, "whether kernel=\"hopper\" runs on CUDA device `device`: compute capability 9.0, and these "
       "kernels built for sm_90a");
    m.def("dq_partials", [](int Nk, const std::string& kernel, bool causal) {
        return flash::dq_partials(Nk, kernel_named(kernel), causal);
    }, "P, the number of dQ partial buffers of the deterministic backward");
}
#endif  // FLASH_ATTENTION_WITH_TORCH
