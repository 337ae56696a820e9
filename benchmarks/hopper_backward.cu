// Part III's backward, prototypes (issue 15; benchmarks/NOTES.md): Algorithm 2 for one key
// tile per block (Part II's loop order), its five tile products on warpgroup MMA in 3xTF32.
// Version 1 (measured: 19 TFLOP/s at B*H = 16, N = 4096): one warpgroup per block stages and
// computes in turn, and walks the query tiles 32 rows at a time, so that the operands fit
// in shared memory:
//   S_ij^T  = K_j Q_i^T       (64 x 32): A = K_j, B = Q_i, both K-major over d
//   dP_ij^T = V_j dO_i^T      (64 x 32): A = V_j, B = dO_i
//   dV_j   += P_ij^T dO_i     (64 x 64): A = P^T from registers, B = dO_i^T (rows d, K = queries)
//   dK_j   += dS_ij^T Q_i     (64 x 64): A = dS^T from registers, B = Q_i^T
//   dQ_i^T += K_j^T dS_ij^T   (64 x 32): A = K_j^T (rows d, K = keys), B = dS_ij (rows queries)
// (wgmma's M is 64 at least, so dQ_i, 32 rows, is computed transposed.) P^T's accumulator
// fragment holds queries 8s + 2t and 8s + 2t + 1 where the A fragment has k = t and t + 4,
// so Q_i^T and dO_i^T keep their queries in that order, as the forward keeps V^T's keys.
// dQ is added with atomics (the default mode). Version 2 (below; measured: 31 TFLOP/s) adds
// a producer warpgroup and two consumers, in 16-query steps. Version 4 (31 TFLOP/s) keeps the
// key tile in the consumers' registers, one consumer per role; version 5 (38) also stages
// each step without bank conflicts; version 6 is version 5's deterministic mode, with Part
// II's partial buffers and chains; versions 7 and 8 (not yet run) are 5 and 6 with a
// producer that copies three steps ahead. Versions 4 to 8 take strided inputs and contain
// NaN and Inf as Part III must (benchmarks/NOTES.md, v34, v36). All are checked against
// float64 on the CPU, then timed at B*H = 16, N = 4096 (versions 2, 5 and 7 also with their
// roles apart: v2::Work); versions 6 and 8 also against their own bits (again, blocks
// started in reverse, one head alone).
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -o /tmp/hopper_backward benchmarks/hopper_backward.cu && timeout 60 /tmp/hopper_backward
//   compute-sanitizer --tool racecheck /tmp/hopper_backward check 8   (version 8's checks alone, untimed)
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../flash_attention.cu"  // version 2: Part III's mbarrier, barrier and register helpers
#include "wgmma.cuh"
#include "layouts.cuh"

using flash::Rows;
using flash::Tensor4;

constexpr int d = 64, Bc = 64, BQ = 32;  // head dim, keys of a block, queries of a step
constexpr int THREADS = 128;             // one warpgroup
constexpr float LOG2E = 1.4426950408889634f;

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// --- wgmma with N = 32 -------------------------------------------------------------------
// D (64 x 32): lane (g, t) of warp w holds d[4n .. 4n + 3] = D[16w + g][8n + 2t], D[16w + g][8n + 2t + 1],
// D[16w + g + 8][8n + 2t], D[16w + g + 8][8n + 2t + 1], n = 0 .. 3.
__device__ __forceinline__ void wgmma_ss32(float (&d)[16], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a), "l"(b), "r"(accumulate));
}

// D (64 x 16), the same layout with n = 0, 1 (version 2's 16-query steps).
__device__ __forceinline__ void wgmma_ss16(float (&d)[8], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(a), "l"(b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_ss_n(float (&d)[16], uint64_t a, uint64_t b, int acc) { wgmma_ss32(d, a, b, acc); }
__device__ __forceinline__ void wgmma_ss_n(float (&d)[8], uint64_t a, uint64_t b, int acc) { wgmma_ss16(d, a, b, acc); }

// --- operands in shared memory (kgroup_major: see wgmma.cuh) -------------------------------
struct Operand {
    float *big, *small;
    int rows, K;
    __device__ __forceinline__ uint64_t big_step(int s) const { return step_descriptor(big, kgroup_major, rows, K, s); }
    __device__ __forceinline__ uint64_t small_step(int s) const {
        return step_descriptor(small, kgroup_major, rows, K, s);
    }
    // x = big + small (split) at element (r, k).
    __device__ __forceinline__ void store(int r, int k, float x) const {
        const int at = element_at(kgroup_major, r, k, rows, K);
        split(x, big[at], small[at]);
    }
};

// Where query (or key) r of a group of 8 sits in a K-major operand fed by an accumulator
// fragment: 2u at position u, 2u + 1 at position u + 4 (the inverse of the forward's key_at).
__device__ __forceinline__ int position_of(int r) {
    const int v = r % 8;
    return (r & ~7) | (v % 2 == 0 ? v / 2 : 4 + v / 2);
}


// D (64 x N) = A B^T in 3xTF32 over K = 64 (8 k-steps), the small cross terms first; N = 32
// (D: 16 floats) or 16 (8 floats).
template <int F>
__device__ __forceinline__ void product_64xN(float (&D)[F], const Operand& A, const Operand& B) {
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_ss_n(D, A.small_step(s), B.big_step(s), s > 0);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_ss_n(D, A.big_step(s), B.small_step(s), 1);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_ss_n(D, A.big_step(s), B.big_step(s), 1);
    wgmma_commit();
    wgmma_wait_all();
}
// D (64 x 64) = X B^T in 3xTF32 over K = the queries of a step (F / 4 k-steps), X a 64 x
// queries accumulator in registers.
template <int F>
__device__ __forceinline__ void product_from_registers(float (&D)[32], const float (&X)[F], const Operand& B) {
    constexpr int STEPS = F / 4;
    uint32_t big[STEPS][4], small[STEPS][4];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) a_from_accumulator(big[s], small[s], X, s);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < STEPS; ++s) wgmma_rs(D, small[s], B.big_step(s), s > 0);
#pragma unroll
    for (int s = 0; s < STEPS; ++s) wgmma_rs(D, big[s], B.small_step(s), 1);
#pragma unroll
    for (int s = 0; s < STEPS; ++s) wgmma_rs(D, big[s], B.big_step(s), 1);
    wgmma_commit();
    wgmma_wait_all();
}

// X^T into B, an operand with the queries as rows: X is a 64 x queries accumulator
// fragment (rows = keys), as dS_ij^T is.
template <int F>
__device__ __forceinline__ void store_transposed(const Operand& B, const float (&X)[F]) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < F / 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) B.store(8 * n + 2 * t + e % 2, 16 * w + g + 8 * (e / 2), X[4 * n + e]);
}
// Line 15's sum: dQ_i += scale (dQ_i^T)^T, from dQ_i^T's accumulator fragment (64 x queries
// q0 ..), by atomics; or, store, dQ_i = scale (dQ_i^T)^T (a deterministic buffer's first writer).
template <int F>
__device__ __forceinline__ void write_dq(Rows<float> dq, const float (&dQt)[F], int q0, int Nq, float softmax_scale,
                                         bool store) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < F / 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = 16 * w + g + 8 * (e / 2), query = q0 + 8 * n + 2 * t + e % 2;
            if (query >= Nq) continue;
            float* const out = dq[query] + col;
            if (store) *out = softmax_scale * dQt[4 * n + e];
            else atomicAdd(out, softmax_scale * dQt[4 * n + e]);
        }
}

// Line 6: key tile j of one head's k and v as K_j, V_j (rows = keys) and K_j^T (rows = d),
// split; zeros past Nk. Thread `thread` of `threads`.
__device__ __forceinline__ void stage_key_tile(const Operand& K_j, const Operand& V_j, const Operand& Kt_j,
                                               const float* k, const float* v, int j, int Nk, int thread,
                                               int threads) {
    for (int f = thread; f < 64 * 16; f += threads) {
        const int r = f / 16, c = 4 * (f % 16), key = j * Bc + r;
        const float4 x = key < Nk ? *reinterpret_cast<const float4*>(k + (size_t)key * d + c) : make_float4(0, 0, 0, 0);
        const float4 y = key < Nk ? *reinterpret_cast<const float4*>(v + (size_t)key * d + c) : make_float4(0, 0, 0, 0);
        const float xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
        for (int e = 0; e < 4; ++e) {
            K_j.store(r, c + e, xs[e]);
            V_j.store(r, c + e, ys[e]);
            Kt_j.store(c + e, r, xs[e]);
        }
    }
}

constexpr size_t SMEM = (6 * 64 * 64 + 10 * BQ * 64 + 2 * BQ) * sizeof(float);  // 176 KiB

// Moves the kernels' pointers to head bh: q, dout, dq are (BH, Nq, 64), k, v, dk, dv
// (BH, Nk, 64), L and D (BH, Nq), all contiguous.
__device__ __forceinline__ void to_head(int bh, int Nq, int Nk, const float*& q, const float*& k, const float*& v,
                                        const float*& dout, const float*& L, const float*& D, float*& dq, float*& dk,
                                        float*& dv) {
    q += (size_t)bh * Nq * d; dout += (size_t)bh * Nq * d; dq += (size_t)bh * Nq * d;
    k += (size_t)bh * Nk * d; v += (size_t)bh * Nk * d; dk += (size_t)bh * Nk * d; dv += (size_t)bh * Nk * d;
    L += (size_t)bh * Nq; D += (size_t)bh * Nq;
}

// One block per (key tile j, head bh): block j * BH + bh. q, k, v, dout, dq, dk, dv are
// (BH, N, 64) contiguous; L and D (BH, Nq).
__global__ void __launch_bounds__(THREADS, 1)
backward_kernel(const float* q, const float* k, const float* v, const float* dout, const float* L, const float* D,
                float* dq, float* dk, float* dv, int BH, int Nq, int Nk, float softmax_scale, bool causal) {
    extern __shared__ __align__(128) float smem[];
    float* next = smem;
    auto operand = [&](int rows, int K) {
        Operand x{next, next + rows * K, rows, K};
        next += 2 * rows * K;
        return x;
    };
    const Operand K_j = operand(64, d), V_j = operand(64, d), Kt_j = operand(d, 64);
    const Operand Q_i = operand(BQ, d), dO_i = operand(BQ, d), Qt_i = operand(d, BQ), dOt_i = operand(d, BQ);
    const Operand dS_ij = operand(BQ, 64);
    float* L_i = next;
    float* D_i = next + BQ;
    const int tid = threadIdx.x, w = tid / 32, g = tid % 32 / 4, t = tid % 4;
    const int j = blockIdx.x / BH, bh = blockIdx.x % BH;
    to_head(bh, Nq, Nk, q, k, v, dout, L, D, dq, dk, dv);
    const float scale_log2 = softmax_scale * LOG2E;

    // line 6: K_j, V_j (rows = keys), K_j^T (rows = d); zeros past Nk
    stage_key_tile(K_j, V_j, Kt_j, k, v, j, Nk, tid, THREADS);
    float dK_j[32], dV_j[32], part[32];  // line 7
    for (int e = 0; e < 32; ++e) dK_j[e] = dV_j[e] = 0.f;

    const int first = causal ? j * Bc / BQ : 0;  // causal: queries before key tile j see none of its keys
    for (int i = first; i < cdiv(Nq, BQ); ++i) {  // line 8
        const int q0 = i * BQ;
        __syncthreads();  // the last step's reads of Q_i .. dS_ij are done
        // line 9: Q_i, dO_i (rows = queries), Q_i^T, dO_i^T (rows = d, queries in position_of order), L_i, D_i
        for (int f = tid; f < BQ * 16; f += THREADS) {
            const int r = f / 16, c = 4 * (f % 16), row = q0 + r;
            const float4 zero = make_float4(0, 0, 0, 0);
            const float4 x = row < Nq ? *reinterpret_cast<const float4*>(q + (size_t)row * d + c) : zero;
            const float4 y = row < Nq ? *reinterpret_cast<const float4*>(dout + (size_t)row * d + c) : zero;
            const float xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
            for (int e = 0; e < 4; ++e) {
                Q_i.store(r, c + e, xs[e]);
                dO_i.store(r, c + e, ys[e]);
                Qt_i.store(c + e, position_of(r), xs[e]);
                dOt_i.store(c + e, position_of(r), ys[e]);
            }
        }
        if (tid < BQ) L_i[tid] = q0 + tid < Nq ? L[q0 + tid] : 0.f;
        else if (tid < 2 * BQ) D_i[tid - BQ] = q0 + tid - BQ < Nq ? D[q0 + tid - BQ] : 0.f;
        fence_proxy_async();
        __syncthreads();

        // lines 10-11: S_ij^T = K_j Q_i^T; P_ij^T = exp(scale S - L), 0 where hidden
        float S[16], dP[16];
        product_64xN(S, K_j, Q_i);
        // line 13: dP_ij^T = V_j dO_i^T
        product_64xN(dP, V_j, dO_i);
        // line 14: dS_ij^T = P_ij^T (dP_ij^T - D_i); S becomes P, dP becomes dS
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j * Bc + 16 * w + g + 8 * (e / 2), col = 8 * n + 2 * t + e % 2, query = q0 + col;
                const bool hidden = query >= Nq || key >= Nk || (causal && key > query);
                const float p = hidden ? 0.f : exp2f(S[4 * n + e] * scale_log2 - L_i[col] * LOG2E);
                S[4 * n + e] = p;
                dP[4 * n + e] = p * (dP[4 * n + e] - D_i[col]);
            }
        // line 12: dV_j += P_ij^T dO_i; line 16: dK_j += dS_ij^T Q_i (each summed from 0, then added)
        product_from_registers(part, S, dOt_i);
        for (int e = 0; e < 32; ++e) dV_j[e] += part[e];
        product_from_registers(part, dP, Qt_i);
        for (int e = 0; e < 32; ++e) dK_j[e] += part[e];
        // line 15: dQ_i^T = K_j^T dS_ij^T, with dS_ij stored as B (rows = queries, K = keys)
        store_transposed(dS_ij, dP);
        fence_proxy_async();
        __syncthreads();
        float dQt[16];
        product_64xN(dQt, Kt_j, dS_ij);
        write_dq(Rows<float>{dq, d}, dQt, q0, Nq, softmax_scale, false);
    }
    // line 18: dK_j (times the scale), dV_j; zero for keys no query sees
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = j * Bc + 16 * w + g + 8 * (e / 2), col = 8 * n + 2 * t + e % 2;
            if (key >= Nk) continue;
            dk[(size_t)key * d + col] = softmax_scale * dK_j[4 * n + e];
            dv[(size_t)key * d + col] = dV_j[4 * n + e];
        }
}

// --- version 2: a producer warpgroup and two consumers ------------------------------------
// Version 1's products, with the work split as Part III's forward splits it: warpgroup 0
// (the producer) copies each step's query rows (cp.async) and stages Q_i, dO_i, Q_i^T and
// dO_i^T split, into a ring of STAGES stages; consumers 1 and 2 take the steps in turn
// (consumer c the steps n = c, c + 2, ...), each summing its own dK_j, dV_j, added at the
// end. full[s]: stage s holds its step (128 producer arrivals); empty[s]: its consumer is
// done reading it (128). The key tile (K_j, V_j, K_j^T) is staged by all three warpgroups
// first. Steps of 16 queries so that the ring and a dS per consumer fit beside the key tile
// (217 KB): S^T, dP^T and dQ^T are m64n16k8.
namespace v2 {
using flash::hopper::mbar_arrive;
using flash::hopper::mbar_init;
using flash::hopper::mbar_wait;
using flash::hopper::warpgroup_sync;

constexpr int BQ = 16, STAGES = 3, THREADS = 384;
constexpr int KEY_OPERAND = 64 * d, QUERY_OPERAND = BQ * d;  // floats of one split part
constexpr int RAW_STRIDE = d + 4;                              // raw rows, padded as Part II's
constexpr int RAW_SLOT = 2 * BQ * RAW_STRIDE + 2 * BQ;          // a step's raw Q_i, dO_i rows; L_i, D_i
constexpr int STAGE = 4 * 2 * QUERY_OPERAND + 2 * BQ;          // Q, dO, Q^T, dO^T split; L_i, D_i
constexpr size_t SMEM = (3 * 2 * KEY_OPERAND + STAGES * STAGE + 2 * 2 * QUERY_OPERAND + RAW_SLOT)
                            * sizeof(float) + 2 * STAGES * sizeof(uint64_t);  // 217 KB
static_assert(SMEM <= 227 * 1024, "one block per SM");

struct Stage {
    Operand Q, dO, Qt, dOt;
    float *L, *D;
};
__device__ __forceinline__ Stage stage_at(float* base) {
    return Stage{Operand{base, base + QUERY_OPERAND, BQ, d},
                 Operand{base + 2 * QUERY_OPERAND, base + 3 * QUERY_OPERAND, BQ, d},
                 Operand{base + 4 * QUERY_OPERAND, base + 5 * QUERY_OPERAND, d, BQ},
                 Operand{base + 6 * QUERY_OPERAND, base + 7 * QUERY_OPERAND, d, BQ},
                 base + 8 * QUERY_OPERAND, base + 8 * QUERY_OPERAND + BQ};
}

// Starts copying rows row0 .. row0 + BQ - 1 of x (zeros from N on) into raw (tid: 0 .. 127).
__device__ __forceinline__ void load_rows_async(float* raw, Rows<const float> x, int row0, int N, int tid) {
    for (int f = tid; f < BQ * 16; f += 128) {
        const int r = f / 16, c = 4 * (f % 16);
        const bool inside = row0 + r < N;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(raw + r * RAW_STRIDE + c)),
                     "l"(x[inside ? row0 + r : 0] + c), "r"(inside ? 16 : 0));
    }
}

// Starts copying L_i and D_i of step q0 (zeros from Nq on) into LD[0 .. BQ - 1] and
// LD[BQ .. 2 BQ - 1], a float a thread: a head's rows of L and D need not be 16-byte aligned.
__device__ __forceinline__ void load_values_async(float* LD, const float* L, const float* D, int q0, int Nq, int tid) {
    if (tid >= 2 * BQ) return;
    const int r = tid % BQ;
    const bool inside = q0 + r < Nq;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(LD + tid)),
                 "l"((tid < BQ ? L : D) + (inside ? q0 + r : 0)), "r"(inside ? 4 : 0));
}
template <int n>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory"); }

// x, or, where contain, Part III's forward's finite_or_zero(x): 0 for a NaN or an Inf, which
// `dropped` records.
__device__ __forceinline__ float contained(float x, bool contain, bool& dropped) {
    return contain ? flash::hopper::finite_or_zero(x, dropped) : x;
}

// Which query of a step sits at K position p of Q_i^T, dO_i^T (the inverse of position_of).
__device__ __forceinline__ int query_at(int p) {
    const int u = p % 8;
    return (p & ~7) | (u < 4 ? 2 * u : 2 * (u - 4) + 1);
}
// Floats 4v .. 4v + 3 of operand X, split, as one 16-byte vector per part.
__device__ __forceinline__ void store_split4(const Operand& X, int v, float4 x) {
    float4 big, small;
    split(x.x, big.x, small.x);
    split(x.y, big.y, small.y);
    split(x.z, big.z, small.z);
    split(x.w, big.w, small.w);
    reinterpret_cast<float4*>(X.big)[v] = big;
    reinterpret_cast<float4*>(X.small)[v] = small;
}
// Line 9 into a stage: raw (BQ rows of d, RAW_STRIDE apart) as X (rows = queries, K = d)
// and X^T (rows = d, K = queries in position_of order), split. Version 2's loop walks the
// source, so a warp's stores land 64 or 32 floats apart: 4- and 8-way bank conflicts, about
// 1,500 store wavefronts a step. This one walks the destination, four floats a thread:
// every store is a whole 16-byte vector of consecutive floats, and the loads from the
// padded raw rows are conflict-free too. Thread tid of the producer's 128. contain: X^T's
// NaN and Inf are staged as 0; returns whether the thread dropped any.
__device__ __forceinline__ bool stage_operands(const Operand& X, const Operand& Xt, const float* raw, int tid,
                                               bool contain) {
    bool dropped = false;
    for (int v = tid; v < BQ * d / 4; v += 128) {
        // X: floats 4v .. 4v + 3 are (r, k0 .. k0 + 3), r = v % 16, k0 = 4 (v / 16) (kgroup_major)
        const float4 x = *reinterpret_cast<const float4*>(raw + (v % BQ) * RAW_STRIDE + 4 * (v / BQ));
        // X^T: floats 4v .. 4v + 3 are (r, 4g .. 4g + 3), r = v % 64, g = v / 64
        auto at = [&](int e) { return contained(raw[query_at(4 * (v / d) + e) * RAW_STRIDE + v % d], contain, dropped); };
        store_split4(X, v, x);
        store_split4(Xt, v, make_float4(at(0), at(1), at(2), at(3)));
    }
    return dropped;
}

// Line 8's sweep of key tile j in steps of BQ queries: step n covers the queries q0(n) ..
// q0(n) + BQ - 1. All of them, upward, unless causal: then from the first step that sees
// key tile j, upward (version 2), or from the last step down to it (descending: versions 4
// to 6; two key tiles that share a deterministic buffer then reach a query step at the same
// step n, as Part II's sweep does).
struct Sweep {
    int first, steps;
    bool descending;
    __device__ __forceinline__ int q0(int n) const { return (descending ? first + steps - 1 - n : first + n) * BQ; }
};
__device__ __forceinline__ Sweep sweep_of(int j, int Nq, bool causal, bool descending) {
    const int first = causal ? j * Bc / BQ : 0, all = cdiv(Nq, BQ);
    return Sweep{first, all > first ? all - first : 0, causal && descending};
}

// The producer, line 9 for every step, `stages` steps ahead at most: it copies each step's
// query rows and L_i, D_i (cp.async) into a ring of `depth` raw slots (RAW_SLOT floats each,
// at raw), depth - 1 steps ahead; for step n it waits for its copies, then until the
// stage's consumers are done with it (empty), stages Q_i, dO_i, Q_i^T, dO_i^T split and
// L_i, D_i, and hands it over (full). stage = false hands the stages over untouched
// (CONSUMERS_ALONE); linear stages with stage_operands, else walking the source, one
// element a thread (versions 2 and 4). The ring has already carried `before` steps (of the
// block's earlier key tiles). containment (versions 4 to 8): the steps with q0 <
// contain_below (a causal diagonal) stage Q_i^T's and dO_i^T's NaN and Inf as 0 and say so
// in the stage's `nonfinite` (see v4).
template <int stages, int depth, bool stage, bool linear, bool containment = false, typename StageAt>
__device__ __forceinline__ void produce(StageAt stage_at, uint64_t* full, uint64_t* empty, float* raw,
                                        Rows<const float> q, Rows<const float> dout, const float* L, const float* D,
                                        Sweep sweep, int before, int Nq, int tid, int contain_below = 0) {
    // Starts copying step m into slot m % depth: one commit group, empty past the last step.
    auto copy = [&](int m) {
        if (stage && m < sweep.steps) {
            float* slot = raw + (m % depth) * RAW_SLOT;
            load_rows_async(slot, q, sweep.q0(m), Nq, tid);
            load_rows_async(slot + BQ * RAW_STRIDE, dout, sweep.q0(m), Nq, tid);
            load_values_async(slot + 2 * BQ * RAW_STRIDE, L, D, sweep.q0(m), Nq, tid);
        }
        flash::fast::cp_async_commit();
    };
    for (int m = 0; m < depth - 1; ++m) copy(m);
    for (int n = 0; n < sweep.steps; ++n) {
        const int ring_step = before + n, s = ring_step % stages, q0 = sweep.q0(n);
        const auto x = stage_at(s);
        const float* raw_Q = raw + (n % depth) * RAW_SLOT;
        const float* raw_dO = raw_Q + BQ * RAW_STRIDE;
        const float* raw_LD = raw_dO + BQ * RAW_STRIDE;
        copy(n + depth - 1);                           // into the slot that step n - 1 was staged from
        cp_async_wait_group<depth - 1>();              // this thread's copies of step n landed
        warpgroup_sync<1>();                           // every producer thread's
        mbar_wait(&empty[s], (ring_step / stages + 1) % 2);  // ring step - stages is done with stage s
        if (stage) {
            const bool contain = containment && q0 < contain_below;
            bool dropped_Q = false, dropped_dO = false;
            if (linear) {
                dropped_Q = stage_operands(x.Q, x.Qt, raw_Q, tid, contain);
                dropped_dO = stage_operands(x.dO, x.dOt, raw_dO, tid, contain);
            } else {
                for (int f = tid; f < BQ * d; f += 128) {  // Q_i, dO_i; Q_i^T, dO_i^T in position_of order
                    const int r = f / d, c = f % d;
                    const float a = raw_Q[r * RAW_STRIDE + c], b = raw_dO[r * RAW_STRIDE + c];
                    x.Q.store(r, c, a);
                    x.dO.store(r, c, b);
                    x.Qt.store(c, position_of(r), contained(a, contain, dropped_Q));
                    x.dOt.store(c, position_of(r), contained(b, contain, dropped_dO));
                }
            }
            if (tid < BQ) x.L[tid] = raw_LD[tid];
            else if (tid < 2 * BQ) x.D[tid - BQ] = raw_LD[tid];
            if constexpr (containment) {
                if (contain) {  // warpgroup_any: a barrier of the producer's warpgroup
                    dropped_Q = flash::hopper::warpgroup_any<1>(dropped_Q);
                    dropped_dO = flash::hopper::warpgroup_any<1>(dropped_dO);
                    if (tid == 0) {
                        x.nonfinite[0] = dropped_Q;
                        x.nonfinite[1] = dropped_dO;
                    }
                }
            }
            fence_proxy_async();
        }
        mbar_arrive(&full[s]);
        warpgroup_sync<1>();                           // every producer thread is done with slot n % depth
    }
}

// What a launch does, for timing the two roles apart: ALL is the backward; PRODUCER_ALONE
// stages every step while the consumers only hand the stages back; CONSUMERS_ALONE computes
// on stages that the producer hands over without loading or staging them (wrong results).
enum Work { ALL, PRODUCER_ALONE, CONSUMERS_ALONE };

// One block per (key tile j, head bh), as version 1.
template <Work work = ALL>
__global__ void __launch_bounds__(THREADS, 1)
backward_kernel(const float* q, const float* k, const float* v, const float* dout, const float* L, const float* D,
                float* dq, float* dk, float* dv, int BH, int Nq, int Nk, float softmax_scale, bool causal) {
    extern __shared__ __align__(128) float smem[];
    const Operand K_j{smem, smem + KEY_OPERAND, 64, d}, V_j{smem + 2 * KEY_OPERAND, smem + 3 * KEY_OPERAND, 64, d},
        Kt_j{smem + 4 * KEY_OPERAND, smem + 5 * KEY_OPERAND, d, 64};
    float* ring = smem + 6 * KEY_OPERAND;
    float* dS_area = ring + STAGES * STAGE;                 // consumer c's dS_ij at 2c parts
    float* raw = dS_area + 4 * QUERY_OPERAND;               // one raw slot
    uint64_t* full = reinterpret_cast<uint64_t*>(raw + RAW_SLOT);
    uint64_t* empty = full + STAGES;
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, w = tid / 32, g = tid % 32 / 4, t = tid % 4;
    const int j = blockIdx.x / BH, bh = blockIdx.x % BH;
    to_head(bh, Nq, Nk, q, k, v, dout, L, D, dq, dk, dv);
    const Sweep sweep = sweep_of(j, Nq, causal, false);

    // line 6: K_j, V_j, K_j^T by every thread; the mbarriers
    stage_key_tile(K_j, V_j, Kt_j, k, v, j, Nk, threadIdx.x, THREADS);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 128);
            mbar_init(&empty[s], 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    fence_proxy_async();
    __syncthreads();

    if (wg == 0) {  // the producer
        flash::hopper::registers_down<40>();
        produce<STAGES, 1, work != CONSUMERS_ALONE, false>([&](int s) { return stage_at(ring + s * STAGE); }, full,
                                                           empty, raw, Rows<const float>{q, d},
                                                           Rows<const float>{dout, d}, L, D, sweep, 0, Nq, tid);
        return;
    }
    // consumer c: lines 10-16 for its steps, then line 18 with the other consumer's sums
    flash::hopper::registers_up<232>();
    const int c = wg - 1;
    const Operand dS_ij{dS_area + 2 * c * QUERY_OPERAND, dS_area + (2 * c + 1) * QUERY_OPERAND, BQ, 64};
    const float scale_log2 = softmax_scale * LOG2E;
    float dK_j[32], dV_j[32], part[32];  // line 7
    for (int e = 0; e < 32; ++e) dK_j[e] = dV_j[e] = 0.f;
    for (int n = c; n < sweep.steps; n += 2) {
        const int s = n % STAGES, q0 = sweep.q0(n);
        const Stage x = stage_at(ring + s * STAGE);
        mbar_wait(&full[s], (n / STAGES) % 2);
        if (work == PRODUCER_ALONE) {
            mbar_arrive(&empty[s]);
            continue;
        }
        float S[8] = {}, dP[8] = {};  // zeros: ptxas otherwise breaks the chain with a wait (C7517)
        product_64xN(S, K_j, x.Q);     // lines 10-11: S_ij^T = K_j Q_i^T
        product_64xN(dP, V_j, x.dO);   // line 13: dP_ij^T = V_j dO_i^T
#pragma unroll
        for (int nb = 0; nb < 2; ++nb)  // line 14: S becomes P^T, dP becomes dS^T
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j * Bc + 16 * w + g + 8 * (e / 2), col = 8 * nb + 2 * t + e % 2, query = q0 + col;
                const bool hidden = query >= Nq || key >= Nk || (causal && key > query);
                const float p = hidden ? 0.f : exp2f(S[4 * nb + e] * scale_log2 - x.L[col] * LOG2E);
                S[4 * nb + e] = p;
                dP[4 * nb + e] = p * (dP[4 * nb + e] - x.D[col]);
            }
        product_from_registers(part, S, x.dOt);  // line 12: dV_j += P_ij^T dO_i
        for (int e = 0; e < 32; ++e) dV_j[e] += part[e];
        product_from_registers(part, dP, x.Qt);  // line 16: dK_j += dS_ij^T Q_i
        for (int e = 0; e < 32; ++e) dK_j[e] += part[e];
        mbar_arrive(&empty[s]);  // the last read of stage s
        // line 15: dQ_i^T = K_j^T dS_ij^T, dS_ij stored as B (rows = queries, K = keys)
        if (c == 0) warpgroup_sync<2>();  // the last step's dQ product has read dS_ij
        else warpgroup_sync<3>();
        store_transposed(dS_ij, dP);
        fence_proxy_async();
        if (c == 0) warpgroup_sync<2>();
        else warpgroup_sync<3>();
        float dQt[8];
        product_64xN(dQt, Kt_j, dS_ij);
        write_dq(Rows<float>{dq, d}, dQt, q0, Nq, softmax_scale, false);
    }
    // line 18: consumer 1 hands its sums over through the ring (both consumers are past their
    // last reads of it), consumer 0 adds them and writes dK_j (times the scale), dV_j.
    float* handover = ring;
    asm volatile("bar.sync 4, 256;\n" ::: "memory");
    if (c == 1)
        for (int e = 0; e < 32; ++e) {
            handover[e * 128 + tid] = dK_j[e];
            handover[(32 + e) * 128 + tid] = dV_j[e];
        }
    asm volatile("bar.sync 4, 256;\n" ::: "memory");
    if (c == 1) return;
#pragma unroll
    for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = j * Bc + 16 * w + g + 8 * (e / 2), col = 8 * nb + 2 * t + e % 2, r = 4 * nb + e;
            if (key >= Nk) continue;
            dk[(size_t)key * d + col] = softmax_scale * (dK_j[r] + handover[r * 128 + tid]);
            dv[(size_t)key * d + col] = dV_j[r] + handover[(32 + r) * 128 + tid];
        }
}

}  // namespace v2

// --- version 4: the key tile in registers, a consumer per role -----------------------------
// Version 2 reads K_j, V_j and K_j^T from shared memory in every m64n16 product: 2 KB of A
// for 512 bytes of B, 144 of the 260 KB a step moves through shared memory, which then
// bounds the step at about 2,030 clocks (benchmarks/NOTES.md, v32). Here each operand of
// the key tile lives in the registers of the one consumer that multiplies by it, for the
// whole loop, split once (64 registers a thread), and the consumers take roles instead of
// steps; each handles every step:
//   consumer 1 (scores):    S_ij^T = K_j Q_i^T, P_ij^T; dV_j += P_ij^T dO_i
//   consumer 2 (gradients): dP_ij^T = V_j dO_i^T, dS_ij^T = P_ij^T (dP_ij^T - D_i); dK_j += dS_ij^T Q_i
//   consumer 3 (dQ):        dQ_i^T = K_j^T dS_ij^T, added to dQ by atomics
// P_ij^T goes from consumer 1 to 2 through the stage (each thread's own 8 values: the two
// accumulators have the same layout), dS_ij from 2 to 3 split as wgmma's B operand. The
// m64n16 products then read 512 bytes of shared memory each, and a step moves about 124 KB.
// The producer is version 2's. Barriers per stage: full (producer -> 1, 2), scores (1 -> 2),
// gradients (2 -> 3), empty (1, 2, 3 -> producer).
// Versions 4 to 8 take what Part III's backward must: q, k, v, dout, dq, dk, dv with any
// batch, head and row strides (Tensor4: rows of 64 contiguous floats, 16-byte aligned), L
// and D contiguous, any Nq and Nk, and NaN and Inf where they are:
// NaN containment (causal). A step on key tile j's diagonal (q0 < (j + 1) Bc - 1) holds
// pairs hidden from each other, and 0 x Inf is NaN: a NaN or an Inf must reach exactly the
// rows and columns that see it (flash_attention.cu, Part I). S^T and dP^T need nothing, as
// P^T and dS^T replace their hidden entries by 0 rather than multiply them. The products
// that multiply hidden zeros into an operand are dV_j += P^T dO_i (B = dO_i^T), dK_j += dS^T
// Q_i (B = Q_i^T) and dQ_i^T = K_j^T dS^T (A = K_j^T). So on diagonal steps the producer
// stages the NaN and Inf of Q_i^T and dO_i^T as 0 and flags the stage, and the dQ consumer
// holds those of K_j^T as 0 for the whole tile; a consumer that meets a flag adds, pair by
// visible pair, the products it left out, each value read from global memory (as Part III's
// forward does with V).
namespace v4 {
using flash::hopper::mbar_arrive;
using flash::hopper::mbar_init;
using flash::hopper::mbar_wait;
using flash::hopper::warpgroup_sync;
using v2::BQ;
using v2::contained;
using v2::QUERY_OPERAND;
using v2::RAW_SLOT;
using v2::RAW_STRIDE;
using v2::produce;

constexpr int STAGES = 4, THREADS = 512;
constexpr int STAGE = 8 * QUERY_OPERAND + 2 * BQ * 64 + 64 * BQ + 2 * BQ + 32;  // Q, dO, Q^T, dO^T; dS; P; L_i, D_i; flags
// The stages, `depth` raw slots (v2::produce), the barriers: 186 KB with one slot, 212 with four.
constexpr size_t smem_bytes(int depth) {
    return (STAGES * STAGE + depth * RAW_SLOT) * sizeof(float) + 4 * STAGES * sizeof(uint64_t);
}
static_assert(smem_bytes(4) <= 227 * 1024, "one block per SM");

struct Stage {
    Operand Q, dO, Qt, dOt, dS;
    float *P, *L, *D;
    int* nonfinite;  // a diagonal step's flags: [0] Q_i^T, [1] dO_i^T held a NaN or Inf (staged as 0)
};
__device__ __forceinline__ Stage stage_at(float* base) {
    float* dS = base + 8 * QUERY_OPERAND;
    float* P = dS + 2 * BQ * 64;
    float* L = P + 64 * BQ;
    return Stage{Operand{base, base + QUERY_OPERAND, BQ, d},
                 Operand{base + 2 * QUERY_OPERAND, base + 3 * QUERY_OPERAND, BQ, d},
                 Operand{base + 4 * QUERY_OPERAND, base + 5 * QUERY_OPERAND, d, BQ},
                 Operand{base + 6 * QUERY_OPERAND, base + 7 * QUERY_OPERAND, d, BQ},
                 Operand{dS, dS + BQ * 64, BQ, 64},
                 P, L, L + BQ, reinterpret_cast<int*>(L + 2 * BQ)};
}

// D (64 x 16) += A B^T, A from registers (the mma.sync m16n8k8 A fragment, per warp).
__device__ __forceinline__ void wgmma_rs16(float (&d)[8], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// A key-tile operand (64 rows x K = 64), split, as wgmma's A fragments for its 8 k-steps:
// A[r][c] = x[row0 + r][c], or x[row0 + c][r] transposed; zeros from row N on. contain: NaN
// and Inf become 0 too; returns whether any of the thread's did.
struct Fragments {
    uint32_t big[8][4], small[8][4];
};
__device__ __forceinline__ bool load_fragments(Fragments& A, Rows<const float> x, int row0, int N, bool transposed,
                                               bool contain) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    bool dropped = false;
#pragma unroll
    for (int s = 0; s < 8; ++s)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = 16 * w + g + 8 * (e % 2), c = 8 * s + t + 4 * (e / 2);
            const int row = row0 + (transposed ? c : r), col = transposed ? r : c;
            float b, sm;
            split(contained(row < N ? x[row][col] : 0.f, contain, dropped), b, sm);
            A.big[s][e] = __float_as_uint(b);
            A.small[s][e] = __float_as_uint(sm);
        }
    return dropped;
}

// D (64 x 16) = A B^T in 3xTF32 over K = 64, A from registers, the small cross terms first.
__device__ __forceinline__ void product_64x16(float (&D)[8], const Fragments& A, const Operand& B) {
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_rs16(D, A.small[s], B.big_step(s), s > 0);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_rs16(D, A.big[s], B.small_step(s), 1);
#pragma unroll
    for (int s = 0; s < 8; ++s) wgmma_rs16(D, A.big[s], B.big_step(s), 1);
    wgmma_commit();
    wgmma_wait_all();
}
// D (64 x 64) += X B^T in 3xTF32 over the 16 queries of a step, X a 64 x 16 accumulator.
__device__ __forceinline__ void accumulate_64x64(float (&D)[32], const float (&X)[8], const Operand& B) {
    uint32_t big[2][4], small[2][4];
#pragma unroll
    for (int s = 0; s < 2; ++s) a_from_accumulator(big[s], small[s], X, s);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 2; ++s) wgmma_rs(D, small[s], B.big_step(s), 1);
#pragma unroll
    for (int s = 0; s < 2; ++s) wgmma_rs(D, big[s], B.small_step(s), 1);
#pragma unroll
    for (int s = 0; s < 2; ++s) wgmma_rs(D, big[s], B.big_step(s), 1);
    wgmma_commit();
    wgmma_wait_all();
}

// Line 18 for one of dK_j, dV_j (a 64 x 64 accumulator), times `scale`; keys from Nk on are not written.
__device__ __forceinline__ void write_key_rows(Rows<float> out, const float (&X)[32], int j, int Nk, float scale) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = j * Bc + 16 * w + g + 8 * (e / 2), col = 8 * n + 2 * t + e % 2;
            if (key < Nk) out[key][col] = scale * X[4 * n + e];
        }
}

// Whether query `query` sees key `key`: Part I's mask, and no query from Nq on sees any.
__device__ __forceinline__ bool sees(int query, int key, int Nq, int Nk, bool causal) {
    return query < Nq && !flash::masked(query, key, Nk, causal);
}
// Operand B of a step's element (r, k), big + small: the value that was split, exactly.
__device__ __forceinline__ float value_at(const Operand& B, int r, int k) {
    const int at = element_at(kgroup_major, r, k, B.rows, B.K);
    return B.big[at] + B.small[at];
}

// The rare path of lines 12 and 16 on a flagged diagonal step: acc (dV_j or dK_j, keys x d)
// += C^T X over the visible pairs where X (dO_i or Q_i, from global memory) is a NaN or an
// Inf. c_at(k, r): C^T (P^T or dS^T) at the tile's key row k and the step's query r.
template <typename CAt>
__device__ __forceinline__ void add_nonfinite_rows(float (&acc)[32], Rows<const float> X, CAt c_at, int j, int q0,
                                                   int Nq, int Nk, bool causal) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int r = 0; r < BQ && q0 + r < Nq; ++r) {
        bool seen[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) seen[h] = sees(q0 + r, j * Bc + 16 * w + g + 8 * h, Nq, Nk, causal);
        if (!seen[0] && !seen[1]) continue;
#pragma unroll
        for (int c = 0; c < 16; ++c) {  // the thread's columns 8 (c / 2) + 2t + c % 2
            const float x = X[q0 + r][8 * (c / 2) + 2 * t + c % 2];
            if (isfinite(x)) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h)
                if (seen[h]) acc[4 * (c / 2) + 2 * h + c % 2] += c_at(16 * w + g + 8 * h, r) * x;
        }
    }
}
// The rare path of line 15 where K_j held a NaN or an Inf (causal; held as 0 in K_j^T):
// dQ_i^T (d x queries) += K_j^T dS^T over the visible pairs where K_j (from global memory)
// is not finite.
__device__ __forceinline__ void add_nonfinite_keys(float (&dQt)[8], Rows<const float> K, const Operand& dS, int j,
                                                   int q0, int Nq, int Nk, bool causal) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int c = 0; c < Bc && j * Bc + c < Nk; ++c) {
        const int key = j * Bc + c;
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // the thread's rows of dQ_i^T: columns 16w + g + 8h of K_j
            const float x = K[key][16 * w + g + 8 * h];
            if (isfinite(x)) continue;
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int r = 8 * n + 2 * t + e;
                    if (sees(q0 + r, key, Nq, Nk, causal)) dQt[4 * n + 2 * h + e] += value_at(dS, r, c) * x;
                }
        }
    }
}

// One block per (key tile j, head bh), as versions 1 and 2. Version 4 stages with version
// 2's loop; versions 5 to 8 with stage_operands.
// Versions 6 and 8 are the deterministic mode, Part II's (flash_attention.cu): key tile j writes its
// shares of dQ into buffer j mod P (buffer 0 is dq, buffers 1 .. P-1 are dq_partial), after
// key tile j - P and before j + P. Each warp of the dQ consumer publishes how many steps it
// has written (dq_progress: 4 ints a tile, then a flag a tile), and before it writes step n
// waits until the same warp of tile j - P has written step n: the same query step, as both
// sweep downward when causal. A block takes its tiles with flash::fast::take_tiles, so it
// waits only on tiles that started blocks took; every role then walks the same tiles, the
// ring's steps running on from one to the next. reversed_start (the checks): the blocks take
// tiles as if the GPU started them last to first. Part I's dq_sum_kernel adds the buffers.
// `work` times the roles apart, as version 2's (PRODUCER_ALONE: the consumers only pass the
// barriers on; CONSUMERS_ALONE: the producer hands the stages over unstaged). depth: the
// producer's raw slots, so that it copies depth - 1 steps ahead (versions 7 and 8: 4).
template <bool linear_staging, bool deterministic, v2::Work work = v2::ALL, int depth = 1>
__global__ void __launch_bounds__(THREADS, 1)
backward_kernel(flash::In q, flash::In k, flash::In v, flash::In dout, const float* L, const float* D,
                flash::Out dq, float* dq_partial, int* dq_progress, flash::Out dk, flash::Out dv, int BH, int Nq,
                int Nk, int P, float softmax_scale, bool causal, bool reversed_start) {
    extern __shared__ __align__(128) float smem[];
    float* ring = smem;
    float* raw = ring + STAGES * STAGE;                     // the producer's raw slots
    uint64_t* full = reinterpret_cast<uint64_t*>(raw + depth * RAW_SLOT);
    uint64_t* scores = full + STAGES;
    uint64_t* gradients = scores + STAGES;
    uint64_t* empty = gradients + STAGES;
    const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, w = tid / 32, g = tid % 32 / 4, t = tid % 4;
    const int Tc = cdiv(Nk, Bc), stride = P * BH;          // tile - stride: the previous tile of its buffer
    const bool chained = deterministic && Tc > P;
    const int last = reversed_start ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // the block's own tile
    const int first = chained ? flash::fast::take_tiles(dq_progress + (size_t)Tc * BH * 4, last, stride) : last;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], 128);
            mbar_init(&scores[s], 128);
            mbar_init(&gradients[s], 128);
            mbar_init(&empty[s], 3 * 128);
            stage_at(ring + s * STAGE).nonfinite[0] = stage_at(ring + s * STAGE).nonfinite[1] = 0;  // CONSUMERS_ALONE
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (first < 0) return;  // another block took this tile

    // Runs role(tile, j, bh, sweep, before) for the block's tiles, first, first + stride, ...,
    // last; `before`: the ring steps of the tiles before this one.
    auto for_each_tile = [&](auto role) {
        for (int tile = first, before = 0;; tile += stride) {
            const int j = tile / BH, bh = tile % BH;
            const v2::Sweep sweep = v2::sweep_of(j, Nq, causal, true);
            role(tile, j, bh, sweep, before);
            if (tile == last) break;
            before += sweep.steps;
        }
    };
    // Whether step q0 of key tile j is on its causal diagonal (holds hidden pairs).
    auto diagonal = [&](int j, int q0) { return causal && q0 < (j + 1) * Bc - 1; };

    if (wg == 0) {  // the producer: version 2's, with stage_operands in versions 5 to 8
        flash::hopper::registers_down<40>();
        for_each_tile([&](int, int j, int bh, v2::Sweep sweep, int before) {
            produce<STAGES, depth, work != v2::CONSUMERS_ALONE, linear_staging, true>(
                [&](int s) { return stage_at(ring + s * STAGE); }, full, empty, raw, q.head(bh),
                dout.head(bh), L + (size_t)bh * Nq, D + (size_t)bh * Nq, sweep, before, Nq, tid,
                causal ? (j + 1) * Bc - 1 : 0);
        });
        return;
    }
    if (wg == 1) {  // scores: lines 10-12
        flash::hopper::registers_up<168>();
        const float scale_log2 = softmax_scale * LOG2E;
        for_each_tile([&](int, int j, int bh, v2::Sweep sweep, int before) {
            Fragments K_j;  // line 6
            load_fragments(K_j, k.head(bh), j * Bc, Nk, false, false);
            float dV_j[32] = {};  // line 7
            for (int n = 0; n < sweep.steps; ++n) {
                const int ring_step = before + n, s = ring_step % STAGES, q0 = sweep.q0(n);
                const Stage x = stage_at(ring + s * STAGE);
                mbar_wait(&full[s], (ring_step / STAGES) % 2);
                if (work == v2::PRODUCER_ALONE) {
                    mbar_arrive(&scores[s]);
                    mbar_arrive(&empty[s]);
                    continue;
                }
                float S[8] = {};  // zeros: ptxas otherwise breaks the chain with a wait (C7517)
                product_64x16(S, K_j, x.Q);  // lines 10-11: S_ij^T = K_j Q_i^T, then P_ij^T
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int key = j * Bc + 16 * w + g + 8 * (e % 4 / 2), col = 8 * (e / 4) + 2 * t + e % 2;
                    S[e] = sees(q0 + col, key, Nq, Nk, causal) ? exp2f(S[e] * scale_log2 - x.L[col] * LOG2E) : 0.f;
                    x.P[e * 128 + tid] = S[e];
                }
                mbar_arrive(&scores[s]);
                accumulate_64x64(dV_j, S, x.dOt);  // line 12: dV_j += P_ij^T dO_i
                if (diagonal(j, q0) && x.nonfinite[1]) {  // the rare path: dO_i held a NaN or Inf
                    __syncwarp();                         // the warp's P^T, all 16 queries of its keys
                    auto P_at = [&](int key, int r) {     // as thread (key, r) stored it above
                        return x.P[(4 * (r / 8) + 2 * (key / 8 % 2) + r % 2) * 128 + 32 * (key / 16) + 4 * (key % 8) +
                                   r % 8 / 2];
                    };
                    add_nonfinite_rows(dV_j, dout.head(bh), P_at, j, q0, Nq, Nk, causal);
                }
                mbar_arrive(&empty[s]);
            }
            write_key_rows(dv.head(bh), dV_j, j, Nk, 1.f);
        });
        return;
    }
    if (wg == 2) {  // gradients: lines 13, 14, 16
        flash::hopper::registers_up<168>();
        for_each_tile([&](int, int j, int bh, v2::Sweep sweep, int before) {
            Fragments V_j;
            load_fragments(V_j, v.head(bh), j * Bc, Nk, false, false);
            float dK_j[32] = {};
            for (int n = 0; n < sweep.steps; ++n) {
                const int ring_step = before + n, s = ring_step % STAGES, q0 = sweep.q0(n);
                const Stage x = stage_at(ring + s * STAGE);
                mbar_wait(&full[s], (ring_step / STAGES) % 2);
                if (work == v2::PRODUCER_ALONE) {
                    mbar_arrive(&gradients[s]);
                    mbar_arrive(&empty[s]);
                    continue;
                }
                float dP[8] = {};
                product_64x16(dP, V_j, x.dO);  // line 13: dP_ij^T = V_j dO_i^T
                mbar_wait(&scores[s], (ring_step / STAGES) % 2);
#pragma unroll
                for (int e = 0; e < 8; ++e) {  // line 14: dS_ij^T = P_ij^T (dP_ij^T - D_i), 0 where hidden
                    const int key = j * Bc + 16 * w + g + 8 * (e % 4 / 2), col = 8 * (e / 4) + 2 * t + e % 2;
                    dP[e] = sees(q0 + col, key, Nq, Nk, causal) ? x.P[e * 128 + tid] * (dP[e] - x.D[col]) : 0.f;
                }
                store_transposed(x.dS, dP);  // dS_ij as B of line 15 (rows = queries, K = keys)
                fence_proxy_async();
                mbar_arrive(&gradients[s]);
                accumulate_64x64(dK_j, dP, x.Qt);  // line 16: dK_j += dS_ij^T Q_i
                if (diagonal(j, q0) && x.nonfinite[0]) {  // the rare path: Q_i held a NaN or Inf
                    __syncwarp();                         // the warp's dS, all 16 queries of its keys
                    auto dS_at = [&](int key, int r) { return value_at(x.dS, r, key); };
                    add_nonfinite_rows(dK_j, q.head(bh), dS_at, j, q0, Nq, Nk, causal);
                }
                mbar_arrive(&empty[s]);
            }
            write_key_rows(dk.head(bh), dK_j, j, Nk, softmax_scale);
        });
        return;
    }
    // dQ: line 15, into dq by atomics, or (deterministic) into buffer j mod P in its turn
    flash::hopper::registers_up<136>();
    for_each_tile([&](int tile, int j, int bh, v2::Sweep sweep, int before) {
        Fragments Kt_j;  // causal: K_j's NaN and Inf held as 0 (the warp's columns of K_j)
        const bool nonfinite_K = __any_sync(0xffffffffu, load_fragments(Kt_j, k.head(bh), j * Bc, Nk, true, causal));
        const Rows<float> out = flash::dq_buffer(dq, dq_partial, deterministic ? j % P : 0, bh, BH, Nq);
        flash::fast::WriteOrder order;  // chained: this warp's count, and tile j - P's
        if (chained) {
            order.mine = dq_progress + (size_t)tile * 4 + w;
            if (j >= P) order.previous = order.mine - (size_t)stride * 4;
        }
        for (int n = 0; n < sweep.steps; ++n) {
            const int ring_step = before + n, s = ring_step % STAGES, q0 = sweep.q0(n);
            const Stage x = stage_at(ring + s * STAGE);
            mbar_wait(&gradients[s], (ring_step / STAGES) % 2);
            if (work == v2::PRODUCER_ALONE) {
                mbar_arrive(&empty[s]);
                continue;
            }
            float dQt[8] = {};
            product_64x16(dQt, Kt_j, x.dS);  // dQ_i^T = K_j^T dS_ij^T
            if (nonfinite_K) add_nonfinite_keys(dQt, k.head(bh), x.dS, j, q0, Nq, Nk, causal);  // the rare path
            mbar_arrive(&empty[s]);
            order.wait_turn(n);
            write_dq(out, dQt, q0, Nq, softmax_scale, deterministic && j < P);
            if (chained) {
                __syncwarp();  // every lane's writes of step n, before lane 0 publishes them
                order.written(n + 1);
            }
        }
    });
}

}  // namespace v4

// --- host ----------------------------------------------------------------------------------

struct Problem {
    int BH, Nq, Nk;
    bool causal;
    std::vector<float> q, k, v, dout, L, D;  // (BH, N, 64); L, D (BH, Nq), from float64
    bool bnhd = false;  // versions 4 to 8: all seven tensors as (B, N, H, 64), H = 2 (layouts.cuh)
};

// What random_problem puts into head 0: a NaN or an Inf at column 7 of key Nk - 1 (V, K) or
// of query Nq / 2 (Q, dO), before L and D are computed from the inputs.
enum Poison { CLEAN, NAN_V, INF_V, NAN_K, NAN_Q, NAN_DO };
const char* const POISONED[] = {"", ", NaN in V", ", Inf in V", ", NaN in K", ", NaN in Q", ", NaN in dO"};

// Random q, k, v, dout; L and D from the forward in float64 (the backward's inputs).
Problem random_problem(int BH, int Nq, int Nk, bool causal, unsigned seed, std::vector<double>* O64 = nullptr,
                       Poison poison = CLEAN) {
    srand(seed);
    Problem p{BH, Nq, Nk, causal, {}, {}, {}, {}, {}, {}};
    auto fill = [](std::vector<float>& x, size_t n) {
        x.resize(n);
        for (float& e : x) {
            const double u1 = (rand() + 1.0) / (RAND_MAX + 2.0), u2 = rand() / (RAND_MAX + 1.0);
            e = (float)(sqrt(-2 * log(u1)) * cos(2 * M_PI * u2));
        }
    };
    fill(p.q, (size_t)BH * Nq * d);
    fill(p.k, (size_t)BH * Nk * d);
    fill(p.v, (size_t)BH * Nk * d);
    fill(p.dout, (size_t)BH * Nq * d);
    const size_t key = (size_t)(Nk - 1) * d + 7, query = (size_t)(Nq / 2) * d + 7;
    if (poison == NAN_V) p.v[key] = NAN;
    if (poison == INF_V) p.v[key] = INFINITY;
    if (poison == NAN_K) p.k[key] = NAN;
    if (poison == NAN_Q) p.q[query] = NAN;
    if (poison == NAN_DO) p.dout[query] = NAN;
    p.L.assign((size_t)BH * Nq, 0.f);
    p.D.assign((size_t)BH * Nq, 0.f);
    if (O64) O64->assign((size_t)BH * Nq * d, 0.0);
    if ((size_t)BH * Nq * Nk > 50'000'000) return p;  // large (timing only): L, D stay 0
    std::vector<double> s(Nk);
    for (int bh = 0; bh < BH; ++bh)
        for (int r = 0; r < Nq; ++r) {
            double mx = -INFINITY;
            for (int c = 0; c < Nk; ++c) {
                double x = 0;
                for (int e = 0; e < d; ++e)
                    x += (double)p.q[((size_t)bh * Nq + r) * d + e] * p.k[((size_t)bh * Nk + c) * d + e];
                s[c] = causal && c > r ? -INFINITY : x * 0.125;
                mx = fmax(mx, s[c]);
            }
            double sum = 0;
            for (int c = 0; c < Nk; ++c) sum += s[c] = exp(s[c] - mx);
            double dsum = 0;
            for (int e = 0; e < d; ++e) {
                double o = 0;
                for (int c = 0; c < Nk; ++c)
                    if (!(causal && c > r)) o += s[c] / sum * p.v[((size_t)bh * Nk + c) * d + e];  // hidden: no term
                if (O64) (*O64)[((size_t)bh * Nq + r) * d + e] = o;
                dsum += (double)p.dout[((size_t)bh * Nq + r) * d + e] * (float)o;
            }
            p.L[(size_t)bh * Nq + r] = (float)(mx + log(sum));
            p.D[(size_t)bh * Nq + r] = (float)dsum;
        }
    return p;
}

// Runs version 1, 2, 4, 5, 6, 7 or 8 once, then `reps` more times between CUDA events; returns
// the median ms and leaves dq, dk, dv in the vectors. `work` picks version 2's, 5's or 7's
// roles (v2::Work); reversed_start makes version 6's or 8's blocks take their tiles as if
// started last to first.
float run(int version, const Problem& p, std::vector<float>& dq, std::vector<float>& dk, std::vector<float>& dv,
          int reps, v2::Work work = v2::ALL, bool reversed_start = false) {
    const size_t nq = (size_t)p.BH * p.Nq * d, nk = (size_t)p.BH * p.Nk * d;
    float *q, *k, *v, *dout, *L, *D, *gq, *gk, *gv;
    for (auto [ptr, n] : {std::pair{&q, nq}, {&dout, nq}, {&gq, nq}, {&k, nk}, {&v, nk}, {&gk, nk}, {&gv, nk},
                          {&L, (size_t)p.BH * p.Nq}, {&D, (size_t)p.BH * p.Nq}})
        CHECK(cudaMalloc(ptr, n * 4));
    // versions 1 and 2 read contiguous (B * H, N, 64) tensors; 4 to 8 any Tensor4
    const bool bnhd = p.bnhd && version >= 4;
    const Tensor4<float> Q = layout(q, p.Nq, bnhd), dO = layout(dout, p.Nq, bnhd), K = layout(k, p.Nk, bnhd),
                         V = layout(v, p.Nk, bnhd), dQ = layout(gq, p.Nq, bnhd), dK = layout(gk, p.Nk, bnhd),
                         dV = layout(gv, p.Nk, bnhd);
    to_gpu(Q, p.q, p.BH, p.Nq);
    to_gpu(dO, p.dout, p.BH, p.Nq);
    to_gpu(K, p.k, p.BH, p.Nk);
    to_gpu(V, p.v, p.BH, p.Nk);
    CHECK(cudaMemcpy(L, p.L.data(), p.L.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(D, p.D.data(), p.D.size() * 4, cudaMemcpyHostToDevice));
    const int Tc = cdiv(p.Nk, Bc), blocks = p.BH * Tc;
    // Versions 6 and 8 (deterministic): P buffers, dq and P - 1 more, as Part II's at most 4;
    // where tiles share a buffer, 5 ints a tile (4 counters, a flag), zeroed before each launch.
    const bool deterministic = version == 6 || version == 8;
    const int P = std::min(Tc, 4);
    const size_t progress_ints = deterministic && Tc > P ? (size_t)blocks * 5 : 0;
    float* partial = nullptr;
    int* progress = nullptr;
    if (deterministic) CHECK(cudaMalloc(&partial, std::max(P - 1, 1) * nq * 4));
    if (progress_ints) CHECK(cudaMalloc(&progress, progress_ints * 4));
    const auto first_versions = version == 1                  ? backward_kernel
                                : work == v2::PRODUCER_ALONE  ? v2::backward_kernel<v2::PRODUCER_ALONE>
                                : work == v2::CONSUMERS_ALONE ? v2::backward_kernel<v2::CONSUMERS_ALONE>
                                                              : v2::backward_kernel<v2::ALL>;
    using v2::ALL, v2::PRODUCER_ALONE, v2::CONSUMERS_ALONE;
    const auto key_tile_in_registers =
        version == 4   ? v4::backward_kernel<false, false>
        : version == 6 ? v4::backward_kernel<true, true>
        : version == 8 ? v4::backward_kernel<true, true, ALL, 4>
        : version == 7 ? (work == PRODUCER_ALONE    ? v4::backward_kernel<true, false, PRODUCER_ALONE, 4>
                          : work == CONSUMERS_ALONE ? v4::backward_kernel<true, false, CONSUMERS_ALONE, 4>
                                                    : v4::backward_kernel<true, false, ALL, 4>)
        : work == PRODUCER_ALONE  ? v4::backward_kernel<true, false, PRODUCER_ALONE>
        : work == CONSUMERS_ALONE ? v4::backward_kernel<true, false, CONSUMERS_ALONE>
                                  : v4::backward_kernel<true, false>;
    const size_t smem = version == 1 ? SMEM : version == 2 ? v2::SMEM : v4::smem_bytes(version >= 7 ? 4 : 1);
    if (version <= 2)
        CHECK(cudaFuncSetAttribute(first_versions, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    else
        CHECK(cudaFuncSetAttribute(key_tile_in_registers, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    auto launch = [&] {
        // the default mode adds into dq = 0; the deterministic one stores each element of dq
        // before it adds to it: NaN until then, so that a store it misses shows
        CHECK(cudaMemsetAsync(gq, deterministic ? 0xFF : 0, nq * 4));
        if (progress_ints) CHECK(cudaMemsetAsync(progress, 0, progress_ints * 4));
        if (version <= 2)
            first_versions<<<blocks, version == 1 ? THREADS : v2::THREADS, smem>>>(
                q, k, v, dout, L, D, gq, gk, gv, p.BH, p.Nq, p.Nk, 0.125f, p.causal);
        else
            key_tile_in_registers<<<blocks, v4::THREADS, smem>>>(in(Q), in(K), in(V), in(dO), L, D, dQ, partial,
                                                                 progress, dK, dV, p.BH, p.Nq, p.Nk, P, 0.125f,
                                                                 p.causal, reversed_start);
        CHECK(cudaGetLastError());
        if (deterministic)  // dq += buffers 1 .. P - 1, in that order (Part I's dq_sum_kernel)
            CHECK(flash::tutorial::sum_dq_partials(partial, dQ, p.BH, p.Nq, P, Bc, p.causal, 0));
    };
    const float ms = median_ms(launch, reps);
    from_gpu(dq, dQ, p.BH, p.Nq);
    from_gpu(dk, dK, p.BH, p.Nk);
    from_gpu(dv, dV, p.BH, p.Nk);
    for (float* x : {q, k, v, dout, L, D, gq, gk, gv, partial}) CHECK(cudaFree(x));
    CHECK(cudaFree(progress));
    return ms;
}

// max |dX - dX64| for dQ, dK, dV against Algorithm 2 in float64 (Part II's errors: ~1e-6 to
// 1e-5). Where the float64 gradient is a NaN or an Inf the kernel's must be one too, and
// nowhere else: a bad input reaches exactly the rows that see it.
bool check(int version, int BH, int Nq, int Nk, bool causal, Poison poison = CLEAN, bool bnhd = false) {
    std::vector<double> O64;
    Problem p = random_problem(BH, Nq, Nk, causal, 4321 + Nq + Nk, &O64, poison);
    p.bnhd = bnhd;
    std::vector<float> dq, dk, dv;
    run(version, p, dq, dk, dv, 0);
    std::vector<double> dq64((size_t)BH * Nq * d, 0.0), dk64((size_t)BH * Nk * d, 0.0), dv64((size_t)BH * Nk * d, 0.0);
    for (int bh = 0; bh < BH; ++bh)
        for (int r = 0; r < Nq; ++r)
            for (int c = 0; c < Nk; ++c) {
                if (causal && c > r) continue;
                const float* qr = &p.q[((size_t)bh * Nq + r) * d];
                const float* kc = &p.k[((size_t)bh * Nk + c) * d];
                const float* vc = &p.v[((size_t)bh * Nk + c) * d];
                const float* dor = &p.dout[((size_t)bh * Nq + r) * d];
                double s = 0, dp = 0;
                for (int e = 0; e < d; ++e) {
                    s += (double)qr[e] * kc[e];
                    dp += (double)dor[e] * vc[e];
                }
                const double P = exp(s * 0.125 - p.L[(size_t)bh * Nq + r]);
                const double dS = P * (dp - p.D[(size_t)bh * Nq + r]);
                for (int e = 0; e < d; ++e) {
                    dq64[((size_t)bh * Nq + r) * d + e] += 0.125 * dS * kc[e];
                    dk64[((size_t)bh * Nk + c) * d + e] += 0.125 * dS * qr[e];
                    dv64[((size_t)bh * Nk + c) * d + e] += P * dor[e];
                }
            }
    auto max_err = [](const std::vector<float>& got, const std::vector<double>& want) {
        double e = 0;
        for (size_t n = 0; n < got.size(); ++n) {
            const bool bad_got = !std::isfinite(got[n]), bad_want = !std::isfinite(want[n]);
            e = fmax(e, bad_got || bad_want ? (bad_got && bad_want ? 0.0 : INFINITY) : fabs(got[n] - want[n]));
        }
        return e;
    };
    const double eq = max_err(dq, dq64), ek = max_err(dk, dk64), ev = max_err(dv, dv64);
    const bool ok = eq < 5e-5 && ek < 5e-5 && ev < 5e-5;
    printf("version %d, BH=%d Nq=%d Nk=%d causal=%d%s%s: max err dQ %.2e, dK %.2e, dV %.2e  %s\n", version, BH, Nq,
           Nk, causal, POISONED[poison], bnhd ? ", (B, N, H, 64) strides" : "", eq, ek, ev, ok ? "ok" : "WRONG");
    return ok;
}

// The deterministic versions' contract (6 and 8; Part II's): the same bits again, with the
// blocks started last to first, and for one head computed alone (head 1 of 3, as a problem of
// its own).
bool check_bits(int version, int Nq, int Nk, bool causal) {
    const Problem p = random_problem(3, Nq, Nk, causal, 99 + Nq + Nk);
    Problem one{1, Nq, Nk, causal, {}, {}, {}, {}, {}, {}};
    auto head1 = [](const std::vector<float>& x, std::vector<float>& y) {  // x is (3, n), y (1, n)
        const size_t n = x.size() / 3;
        y.assign(x.begin() + n, x.begin() + 2 * n);
    };
    for (auto [x, y] : {std::pair{&p.q, &one.q}, {&p.k, &one.k}, {&p.v, &one.v}, {&p.dout, &one.dout}, {&p.L, &one.L},
                        {&p.D, &one.D}})
        head1(*x, *y);
    std::vector<float> out[4][3];  // runs: first, again, reversed start, head 1 alone; dq, dk, dv
    run(version, p, out[0][0], out[0][1], out[0][2], 0);
    run(version, p, out[1][0], out[1][1], out[1][2], 0);
    run(version, p, out[2][0], out[2][1], out[2][2], 0, v2::ALL, true);
    run(version, one, out[3][0], out[3][1], out[3][2], 0);
    bool same[3] = {true, true, true};
    for (int x = 0; x < 3; ++x) {
        const std::vector<float>& first = out[0][x];
        const size_t n = first.size() / 3;  // floats of one head
        same[0] &= memcmp(out[1][x].data(), first.data(), 3 * n * 4) == 0;
        same[1] &= memcmp(out[2][x].data(), first.data(), 3 * n * 4) == 0;
        same[2] &= memcmp(out[3][x].data(), first.data() + n, n * 4) == 0;
    }
    printf("version %d bits, BH=3 Nq=%d Nk=%d causal=%d: again %s, blocks started last to first %s, head 1 alone "
           "%s\n", version, Nq, Nk, causal, same[0] ? "same" : "DIFFERENT", same[1] ? "same" : "DIFFERENT",
           same[2] ? "same" : "DIFFERENT");
    return same[0] && same[1] && same[2];
}

// hopper_backward [check] [version ...]: the versions named (all by default), each checked,
// then timed unless `check` (for compute-sanitizer) before the next.
int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);  // each line as it is printed, should a later version hang
    if (!runs_wgmma()) return 1;
    const bool timed = !(argc > 1 && std::string(argv[1]) == "check");
    std::vector<int> versions;
    for (int a = timed ? 1 : 2; a < argc; ++a) versions.push_back(atoi(argv[a]));
    if (versions.empty()) versions = {1, 2, 4, 5, 6, 7, 8};
    bool ok = true;
    float default_ms[9][2] = {};  // each version's, for the ratio of 6 to 5 and of 8 to 7
    for (int version : versions) {
        for (bool causal : {false, true}) {
            ok &= check(version, 2, 64, 64, causal);
            ok &= check(version, 2, 100, 37, causal);
            ok &= check(version, 2, 37, 300, causal);
            ok &= check(version, 1, 300, 130, causal);
            ok &= check(version, 3, 200, 200, causal);
            ok &= check(version, 2, 300, 700, causal);
            if (version < 4) continue;  // versions 4 to 8: strides, NaN and Inf too
            ok &= check(version, 4, 200, 130, causal, CLEAN, true);
            for (Poison poison : {NAN_V, INF_V, NAN_K, NAN_Q, NAN_DO}) ok &= check(version, 2, 300, 300, causal, poison);
            if (version == 6 || version == 8) {
                ok &= check_bits(version, 200, 300, causal);
                ok &= check_bits(version, 300, 700, causal);
            }
        }
        for (bool causal : {false, true}) {
            if (!timed) break;
            const Problem p = random_problem(16, 4096, 4096, causal, 7);
            std::vector<float> dq, dk, dv;
            const float ms = run(version, p, dq, dk, dv, 10);
            const double flop = 2.5 * 4.0 * 16 * 4096.0 * 4096.0 * d / (causal ? 2 : 1);
            printf("version %d, B*H=16, N=4096, causal=%d: %.3f ms, %.1f TFLOP/s\n", version, causal, ms,
                   flop / ms / 1e9);
            if (version == 2 || version == 5 || version == 7)
                printf("  its producer alone %.3f ms, its consumers alone %.3f ms\n",
                       run(version, p, dq, dk, dv, 10, v2::PRODUCER_ALONE),
                       run(version, p, dq, dk, dv, 10, v2::CONSUMERS_ALONE));
            default_ms[version][causal] = ms;
            if ((version == 6 || version == 8) && default_ms[version - 1][causal] > 0)
                printf("  deterministic / default (version %d): %.3f\n", version - 1,
                       ms / default_ms[version - 1][causal]);
        }
    }
    return ok ? 0 : 1;
}
