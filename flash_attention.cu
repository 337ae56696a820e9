// =============================================================================
// flash_attention.cu: FP32 FlashAttention for head_dim 64, forward and backward.
//
// What it implements
//   Forward:  Algorithm 1 of FlashAttention (Dao et al., 2022,
//             https://arxiv.org/abs/2205.14135) in the loop order of
//             FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691):
//             the outer loop runs over query tiles (one thread block each), the
//             inner loop over key/value tiles, with the online softmax.
//   Backward: Algorithm 2 of FlashAttention, in FlashAttention-2's order: one
//             thread block per key/value tile walks the query tiles, builds dK_j
//             and dV_j in registers (no atomics) and adds its share of dQ_i.
//
// Kernels (the "tutorial" kernels: 16x16 tiles, 256 threads)
//   flash_forward_kernel       Alg. 1: O = softmax(scale * Q K^T) V, and L = rowwise logsumexp
//   flash_backward_preprocess  D = rowsum(dO * O), one value per query row
//   flash_backward_kernel      Alg. 2: dK, dV per key tile; dQ by atomicAdd (default) or,
//                              deterministic, into per-block partial buffers
//   dq_partials_sum_kernel     deterministic mode: dQ = sum of the partial buffers, in order
//
// Determinism
//   The forward is always deterministic: one block owns a query tile and walks the key
//   tiles j = 0, 1, ... in order. The default backward adds dQ_i with atomicAdd, so the
//   order of the additions (and the last bits of dQ) changes from run to run. The
//   deterministic backward launches P = min(Tc, DQ_PARTIALS) blocks per (batch, head);
//   block p handles key tiles p, p + P, p + 2P, ... and adds its dQ contributions, with
//   plain loads and stores, into its own buffer dQ_partial[p]; a last kernel sums the
//   P buffers in the order p = 0, 1, ..., P-1. P depends only on Nk and Bc, so the
//   result depends neither on B, H nor on the GPU. Extra memory: P * B * H * Nq * 64 floats.
//
// Build and test
//   ./install.sh && ./test_installation.sh     (the Python extension, then every test)
//   nvcc -arch=sm_90 -Xptxas -v -c flash_attention.cu -o /dev/null
//                                               (the kernels alone, without PyTorch)
//   The PyTorch binding at the end of this file is compiled only when
//   FLASH_ATTENTION_WITH_TORCH is defined (setup.py and flash_attention.py define it).
// =============================================================================

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <algorithm>

namespace flash {

// -----------------------------------------------------------------------------
// Constants
// -----------------------------------------------------------------------------

constexpr int d = 64;             // head dimension
constexpr int Br = 16;            // query rows in a tile (Q_i, O_i, dQ_i, L_i, D_i)
constexpr int Bc = 16;            // key/value rows in a tile (K_j, V_j, dK_j, dV_j)
constexpr int THREADS = 256;      // one thread per (tile row, group of 4 columns)
constexpr int LANES_PER_ROW = 16; // the 16 lanes of a half-warp share one tile row
constexpr int SMEM_STRIDE = d + 4;  // padded row: float4 reads of 16 different rows hit 32 banks
constexpr int DQ_PARTIALS = 16;   // most dQ partial buffers in the deterministic backward

static_assert(d == 4 * LANES_PER_ROW, "each of a row's 16 threads owns 4 consecutive columns");
static_assert(Br * LANES_PER_ROW == THREADS && Bc * LANES_PER_ROW == THREADS,
              "a tile of 16 rows x 64 columns is one float4 per thread");
static_assert(Bc == LANES_PER_ROW, "thread (row r, lane c) computes the score S[r][c]");
static_assert(SMEM_STRIDE % 4 == 0, "rows of a shared tile must stay 16-byte aligned");

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// -----------------------------------------------------------------------------
// Device helpers
// -----------------------------------------------------------------------------

// Thread t works on tile row t / 16 and on lane t % 16 of that row: the score S[row][lane]
// and the four columns 4 * lane .. 4 * lane + 3 of the row's output.
__device__ __forceinline__ int tile_row() { return threadIdx.x / LANES_PER_ROW; }
__device__ __forceinline__ int tile_lane() { return threadIdx.x % LANES_PER_ROW; }

// Copy rows row0 .. row0 + 15 of an (N, d) row-major matrix into a shared tile.
// Rows past the end of the matrix (the last, partial tile) are filled with zeros.
__device__ __forceinline__ void load_tile(float (*tile)[SMEM_STRIDE], const float* src,
                                          int row0, int N) {
    const int r = tile_row(), c = 4 * tile_lane();
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < N) x = *reinterpret_cast<const float4*>(src + (int64_t)(row0 + r) * d + c);
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

// -----------------------------------------------------------------------------
// Forward: Algorithm 1 (FlashAttention-2 loop order)
// -----------------------------------------------------------------------------
// One block per (batch * head, query tile i); grid = B * H * Tr blocks.
//   Alg. 1 lines 1-4 (split Q into Tr tiles, K and V into Tc tiles): the indexing below.
//   line 7  (for i = 1 .. Tr)           : the grid: FlashAttention-2 makes the query loop the
//                                         outer one, one block per query tile
//   line 8  (load Q_i)                  : load_tile(Qi, ...) before the loop
//   line 5  (for j = 1 .. Tc)           : the j loop; causal stops at the last tile on or
//                                         below the diagonal
//   line 6  (load K_j, V_j)             : load_tile(Kj / Vj, ...)
//   line 9  (S_ij = scale * Q_i K_j^T)  : dot_row; thread (r, c) computes S_ij[r][c]
//   line 10 (m~, P~ = exp(S - m~), l~)  : row_max, expf, row_sum over the row's 16 lanes
//   line 11 (m_new, l_new)              : m_new = max(m_i, m~); l_i = alpha * l_i + l~
//   line 12 (O_i = alpha * O_i + P~ V_j): acc; P~[r][k] comes from lane k by a shuffle
//   line 12's division by l_i is done once, after the loop (FlashAttention-2);
//   line 13 (write m, l)                : L_i = m_i + log(l_i), the logsumexp the backward uses.
__global__ void __launch_bounds__(THREADS)
flash_forward_kernel(const float* __restrict__ Q,  // (B, H, Nq, d)
                     const float* __restrict__ K,  // (B, H, Nk, d)
                     const float* __restrict__ V,  // (B, H, Nk, d)
                     float* __restrict__ O,        // (B, H, Nq, d)
                     float* __restrict__ L,        // (B, H, Nq)
                     int Nq, int Nk, float softmax_scale, bool causal) {
    __shared__ __align__(16) float Qi[Br][SMEM_STRIDE];
    __shared__ __align__(16) float Kj[Bc][SMEM_STRIDE];
    __shared__ __align__(16) float Vj[Bc][SMEM_STRIDE];

    const int Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    const int i = blockIdx.x % Tr;          // query tile
    const int64_t bh = blockIdx.x / Tr;     // batch * H + head
    Q += bh * Nq * d;
    K += bh * Nk * d;
    V += bh * Nk * d;
    O += bh * Nq * d;
    L += bh * Nq;

    const int r = tile_row(), c = tile_lane();
    const int row = i * Br + r;             // the query row of this thread

    load_tile(Qi, Q, i * Br, Nq);           // Alg. 1 line 8

    float m_i = -INFINITY;                  // running row max     (line 2: m = -inf)
    float l_i = 0.f;                        // running row sum     (line 2: l = 0)
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);  // O_i[r][4c .. 4c+3], unnormalized

    const int last_row = min((i + 1) * Br, Nq) - 1;
    const int Tc_end = causal ? min(Tc, last_row / Bc + 1) : Tc;
    for (int j = 0; j < Tc_end; ++j) {      // Alg. 1 line 5
        load_tile(Kj, K, j * Bc, Nk);       // line 6
        load_tile(Vj, V, j * Bc, Nk);
        __syncthreads();                    // Q_i, K_j, V_j are in shared memory

        // line 9: S_ij[r][c] = scale * Q_i[r] . K_j[c]; hidden keys get -inf
        const int col = j * Bc + c;
        float s = softmax_scale * dot_row(Qi[r], Kj[c]);
        if (masked(row, col, Nk, causal)) s = -INFINITY;

        // lines 10-11: the online softmax. Tile 0 always holds key 0, which no row hides,
        // so m_new is finite from the first tile on and exp(-inf - m_new) = 0.
        const float m_new = fmaxf(m_i, row_max(s));
        const float p = expf(s - m_new);             // P~_ij[r][c]
        const float alpha = expf(m_i - m_new);       // rescales what was accumulated so far
        l_i = alpha * l_i + row_sum(p);

        // line 12: O_i = alpha * O_i + P~_ij V_j
        acc.x *= alpha; acc.y *= alpha; acc.z *= alpha; acc.w *= alpha;
#pragma unroll
        for (int k = 0; k < Bc; ++k) {
            const float p_k = __shfl_sync(0xffffffffu, p, k, LANES_PER_ROW);  // P~_ij[r][k]
            if (!above_diagonal(row, j * Bc + k, causal))
                fma4(acc, p_k, *reinterpret_cast<const float4*>(&Vj[k][4 * c]));
        }
        m_i = m_new;
        __syncthreads();                    // every thread is done with K_j, V_j before the next load
    }

    // line 12's 1/l and line 13: write O_i and L_i for the rows that exist
    if (row < Nq) {
        const float inv_l = 1.f / l_i;
        *reinterpret_cast<float4*>(O + (int64_t)row * d + 4 * c) =
            make_float4(acc.x * inv_l, acc.y * inv_l, acc.z * inv_l, acc.w * inv_l);
        if (c == 0) L[row] = m_i + logf(l_i);
    }
}

// -----------------------------------------------------------------------------
// Backward preprocess: D = rowsum(dO * O)   (Alg. 2 line 19's rowsum, done once per row)
// -----------------------------------------------------------------------------
// One block per (batch * head, query tile); each half-warp reduces one row.
__global__ void __launch_bounds__(THREADS)
flash_backward_preprocess(const float* __restrict__ dO,  // (B, H, Nq, d)
                          const float* __restrict__ O,   // (B, H, Nq, d)
                          float* __restrict__ D,         // (B, H, Nq)
                          int Nq) {
    const int Tr = cdiv(Nq, Br);
    const int i = blockIdx.x % Tr;
    const int64_t bh = blockIdx.x / Tr;
    const int r = tile_row(), c = tile_lane();
    const int row = i * Br + r;

    float partial = 0.f;
    if (row < Nq) {
        const int64_t offset = (bh * Nq + row) * d + 4 * c;
        const float4 x = *reinterpret_cast<const float4*>(dO + offset);
        const float4 y = *reinterpret_cast<const float4*>(O + offset);
        partial = x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
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
//   Alg. 2 line 6  (for j = 1 .. Tc)          : the j loop; load K_j, V_j (line 7)
//   line 8  (dK_j = 0, dV_j = 0)              : dK_acc, dV_acc in registers
//   line 9  (for i = 1 .. Tr)                 : the i loop; causal starts at the first
//                                               query tile that sees key tile j
//   line 10 (load Q_i, dO_i, L_i, D_i)        : D_i comes from flash_backward_preprocess
//   line 11 (S_ij = scale * Q_i K_j^T)        : thread (r, c) computes S_ij[r][c]
//   line 13 (P_ij = exp(S_ij - L_i))          : P recomputed from the saved logsumexp
//   line 16 (dV_j += P_ij^T dO_i)             : dV_acc
//   line 17 (dP_ij = dO_i V_j^T)              : dp
//   line 19-20 (dS_ij = P_ij * (dP_ij - D_i)) : dS
//   line 21 (dQ_i += scale * dS_ij K_j)       : atomicAdd, or the block's partial buffer
//   line 22 (dK_j += scale * dS_ij^T Q_i)     : dK_acc (scaled once, at the end)
//   line 24 (write dK_j, dV_j)                : after the i loop
// Thread (r, c) owns, besides S_ij[r][c], the columns 4c .. 4c+3 of row r of dK_j and dV_j
// (key j * Bc + r) and of row r of dQ_i (query i * Br + r).
__global__ void __launch_bounds__(THREADS)
flash_backward_kernel(const float* __restrict__ Q,   // (B, H, Nq, d)
                      const float* __restrict__ K,   // (B, H, Nk, d)
                      const float* __restrict__ V,   // (B, H, Nk, d)
                      const float* __restrict__ dO,  // (B, H, Nq, d)
                      const float* __restrict__ L,   // (B, H, Nq)
                      const float* __restrict__ D,   // (B, H, Nq)
                      float* __restrict__ dQ,        // (B, H, Nq, d), zeroed; or nullptr
                      float* __restrict__ dQ_partial,// (P, B, H, Nq, d), zeroed; or nullptr
                      float* __restrict__ dK,        // (B, H, Nk, d)
                      float* __restrict__ dV,        // (B, H, Nk, d)
                      int64_t BH, int Nq, int Nk, int slots, float softmax_scale, bool causal) {
    __shared__ __align__(16) float Qi[Br][SMEM_STRIDE];
    __shared__ __align__(16) float dOi[Br][SMEM_STRIDE];
    __shared__ __align__(16) float Kj[Bc][SMEM_STRIDE];
    __shared__ __align__(16) float Vj[Bc][SMEM_STRIDE];
    __shared__ float Pij[Br][Bc];    // row r written by one half-warp: no bank conflicts
    __shared__ float dSij[Br][Bc];
    __shared__ float Li[Br], Di[Br];

    const int Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    const int slot = blockIdx.x % slots;
    const int64_t bh = blockIdx.x / slots;
    Q += bh * Nq * d;
    K += bh * Nk * d;
    V += bh * Nk * d;
    dO += bh * Nq * d;
    L += bh * Nq;
    D += bh * Nq;
    dK += bh * Nk * d;
    dV += bh * Nk * d;
    // Where this block adds dQ: atomically into dQ, or into its own partial buffer.
    float* dQ_out = dQ_partial ? dQ_partial + (slot * BH + bh) * Nq * d : dQ + bh * Nq * d;

    const int r = tile_row(), c = tile_lane();

    for (int j = slot; j < Tc; j += slots) {          // Alg. 2 line 6
        load_tile(Kj, K, j * Bc, Nk);                 // line 7
        load_tile(Vj, V, j * Bc, Nk);
        float4 dK_acc = make_float4(0.f, 0.f, 0.f, 0.f);  // line 8
        float4 dV_acc = make_float4(0.f, 0.f, 0.f, 0.f);

        const int col = j * Bc + c;                   // the key of S_ij[r][c]
        const int i_start = causal ? (j * Bc) / Br : 0;
        for (int i = i_start; i < Tr; ++i) {          // line 9
            load_tile(Qi, Q, i * Br, Nq);             // line 10
            load_tile(dOi, dO, i * Br, Nq);
            if (threadIdx.x < Br) {
                const int q_row = i * Br + threadIdx.x;
                Li[threadIdx.x] = q_row < Nq ? L[q_row] : 0.f;
                Di[threadIdx.x] = q_row < Nq ? D[q_row] : 0.f;
            }
            __syncthreads();                          // Q_i, dO_i, L_i, D_i (and K_j, V_j) loaded

            // A hidden score gets P = dS = 0 outright: S does not depend on it, and 0 * NaN
            // would carry a NaN of a hidden key into the gradients of the queries it is hidden from.
            const int row = i * Br + r;
            const bool hidden = row >= Nq || masked(row, col, Nk, causal);
            const float s = softmax_scale * dot_row(Qi[r], Kj[c]);                  // line 11
            const float p = hidden ? 0.f : expf(s - Li[r]);                         // line 13
            const float dp = dot_row(dOi[r], Vj[c]);                                // line 17
            Pij[r][c] = p;
            dSij[r][c] = hidden ? 0.f : p * (dp - Di[r]);                           // lines 19-20
            __syncthreads();                          // P_ij and dS_ij are complete

            // line 16: dV_j[r] += sum_k P_ij[k][r] * dO_i[k]
            // line 22: dK_j[r] += sum_k dS_ij[k][r] * Q_i[k]
#pragma unroll
            for (int k = 0; k < Br; ++k) {
                if (!above_diagonal(i * Br + k, j * Bc + r, causal)) {
                    fma4(dV_acc, Pij[k][r], *reinterpret_cast<const float4*>(&dOi[k][4 * c]));
                    fma4(dK_acc, dSij[k][r], *reinterpret_cast<const float4*>(&Qi[k][4 * c]));
                }
            }

            // line 21: dQ_i[r] += scale * sum_k dS_ij[r][k] * K_j[k]
            float4 dq = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int k = 0; k < Bc; ++k)
                if (!above_diagonal(row, j * Bc + k, causal))
                    fma4(dq, dSij[r][k], *reinterpret_cast<const float4*>(&Kj[k][4 * c]));
            if (row < Nq) {
                float* out = dQ_out + (int64_t)row * d + 4 * c;
                if (dQ_partial) {
                    // Only this block writes this buffer, and only this thread this float4:
                    // a plain read-modify-write, in the order j = slot, slot + slots, ...
                    float4 old = *reinterpret_cast<float4*>(out);
                    fma4(old, softmax_scale, dq);
                    *reinterpret_cast<float4*>(out) = old;
                } else {
                    atomicAdd(out + 0, softmax_scale * dq.x);
                    atomicAdd(out + 1, softmax_scale * dq.y);
                    atomicAdd(out + 2, softmax_scale * dq.z);
                    atomicAdd(out + 3, softmax_scale * dq.w);
                }
            }
            __syncthreads();                          // Q_i, dO_i, P_ij, dS_ij, K_j, V_j read: free to overwrite
        }

        // line 24: write dK_j, dV_j (zero for keys that no query sees)
        const int key = j * Bc + r;
        if (key < Nk) {
            *reinterpret_cast<float4*>(dK + (int64_t)key * d + 4 * c) =
                make_float4(softmax_scale * dK_acc.x, softmax_scale * dK_acc.y,
                            softmax_scale * dK_acc.z, softmax_scale * dK_acc.w);
            *reinterpret_cast<float4*>(dV + (int64_t)key * d + 4 * c) = dV_acc;
        }
    }
}

// Deterministic mode: dQ = dQ_partial[0] + dQ_partial[1] + ... + dQ_partial[P-1], in that order.
__global__ void dq_partials_sum_kernel(const float4* __restrict__ dQ_partial,  // (P, n4)
                                       float4* __restrict__ dQ,                // (n4)
                                       int64_t n4, int P) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n4; idx += stride) {
        float4 sum = dQ_partial[idx];
        for (int p = 1; p < P; ++p) {
            const float4 x = dQ_partial[p * n4 + idx];
            sum.x += x.x; sum.y += x.y; sum.z += x.z; sum.w += x.w;
        }
        dQ[idx] = sum;
    }
}

// -----------------------------------------------------------------------------
// Host launchers (plain CUDA: pointers in, error code out; every launch is checked)
// -----------------------------------------------------------------------------
// All tensors are contiguous, float32 and 16-byte aligned; BH = B * H.

// How many dQ partial buffers the deterministic backward uses: P = min(Tc, DQ_PARTIALS).
int dq_partials(int Nk) { return Nk == 0 ? 0 : std::min(cdiv(Nk, Bc), DQ_PARTIALS); }

cudaError_t forward(const float* q, const float* k, const float* v, float* o, float* L,
                    int64_t BH, int Nq, int Nk, float softmax_scale, bool causal,
                    cudaStream_t stream) {
    if (BH == 0 || Nq == 0) return cudaSuccess;
    const int64_t blocks = BH * cdiv(Nq, Br);
    if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
    flash_forward_kernel<<<(unsigned)blocks, THREADS, 0, stream>>>(q, k, v, o, L, Nq, Nk,
                                                                   softmax_scale, causal);
    return cudaGetLastError();
}

// dq must be zeroed in the default mode; dq_partial (P * BH * Nq * d floats, zeroed)
// selects the deterministic mode when it is not null.
cudaError_t backward(const float* dout, const float* q, const float* k, const float* v,
                     const float* o, const float* L, float* D, float* dq, float* dq_partial,
                     float* dk, float* dv, int64_t BH, int Nq, int Nk, float softmax_scale,
                     bool causal, cudaStream_t stream) {
    if (BH == 0 || Nk == 0) return cudaSuccess;
    const int64_t Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    if (BH * Tr > INT32_MAX || BH * Tc > INT32_MAX) return cudaErrorInvalidConfiguration;
    if (Nq > 0) {
        flash_backward_preprocess<<<(unsigned)(BH * Tr), THREADS, 0, stream>>>(dout, o, D, Nq);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    const int slots = dq_partial ? dq_partials(Nk) : (int)Tc;
    flash_backward_kernel<<<(unsigned)(BH * slots), THREADS, 0, stream>>>(
        q, k, v, dout, L, D, dq, dq_partial, dk, dv, BH, Nq, Nk, slots, softmax_scale, causal);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !dq_partial || Nq == 0) return err;

    const int64_t n4 = BH * Nq * d / 4;
    const unsigned sum_blocks = (unsigned)std::min<int64_t>((n4 + THREADS - 1) / THREADS, 65536);
    dq_partials_sum_kernel<<<sum_blocks, THREADS, 0, stream>>>(
        reinterpret_cast<const float4*>(dq_partial), reinterpret_cast<float4*>(dq), n4, slots);
    return cudaGetLastError();
}

}  // namespace flash

// -----------------------------------------------------------------------------
// PyTorch binding (compiled with -DFLASH_ATTENTION_WITH_TORCH)
// -----------------------------------------------------------------------------
// flash_attention.py validates what users pass and declares the torch.library ops; these
// functions are the CUDA implementations behind them. The checks below guard this
// module's own contract with its Python caller.
#ifdef FLASH_ATTENTION_WITH_TORCH
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
    TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                " must be 16-byte aligned");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                bool causal, double softmax_scale) {
    check_tensor(q, "q", 4);
    check_tensor(k, "k", 4);
    check_tensor(v, "v", 4);
    TORCH_CHECK(q.size(3) == flash::d && k.sizes() == v.sizes() &&
                    q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.size(3) == flash::d,
                "q (B, H, Nq, 64), k and v (B, H, Nk, 64) expected");
    TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "q, k, v on one device");
    const c10::cuda::CUDAGuard guard(q.device());
    auto o = at::empty_like(q);
    auto L = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
    C10_CUDA_CHECK(flash::forward(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                  o.data_ptr<float>(), L.data_ptr<float>(),
                                  q.size(0) * q.size(1), q.size(2), k.size(2),
                                  (float)softmax_scale, causal,
                                  at::cuda::getCurrentCUDAStream()));
    return {o, L};
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& o, const at::Tensor& L,
                                 bool causal, double softmax_scale, bool deterministic) {
    check_tensor(dout, "dout", 4);
    check_tensor(q, "q", 4);
    check_tensor(k, "k", 4);
    check_tensor(v, "v", 4);
    check_tensor(o, "out", 4);
    check_tensor(L, "L", 3);
    TORCH_CHECK(dout.sizes() == q.sizes() && o.sizes() == q.sizes() && k.sizes() == v.sizes(),
                "dout and out must have q's shape, v k's shape");
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t BH = q.size(0) * q.size(1);
    const int Nq = q.size(2), Nk = k.size(2);
    auto dq = at::zeros_like(q);
    auto dk = at::empty_like(k);
    auto dv = at::empty_like(v);
    auto D = at::empty_like(L);
    at::Tensor dq_partial;
    if (deterministic)
        dq_partial = at::zeros({flash::dq_partials(Nk), BH, Nq, flash::d}, q.options());
    C10_CUDA_CHECK(flash::backward(
        dout.data_ptr<float>(), q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
        o.data_ptr<float>(), L.data_ptr<float>(), D.data_ptr<float>(), dq.data_ptr<float>(),
        deterministic ? dq_partial.data_ptr<float>() : nullptr, dk.data_ptr<float>(),
        dv.data_ptr<float>(), BH, Nq, Nk, (float)softmax_scale, causal,
        at::cuda::getCurrentCUDAStream()));
    return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "CUDA kernels of flash_attention.py (see flash_attention.cu)";
    m.def("forward", &forward, "O, L = forward(q, k, v, causal, softmax_scale)");
    m.def("backward", &backward,
          "dq, dk, dv = backward(dout, q, k, v, out, L, causal, softmax_scale, deterministic)");
    m.attr("DQ_PARTIALS") = flash::DQ_PARTIALS;
    m.attr("Br") = flash::Br;
    m.attr("Bc") = flash::Bc;
}
#endif  // FLASH_ATTENTION_WITH_TORCH
