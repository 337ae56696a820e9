// Part III prototype, version 1 (issue 15; benchmarks/NOTES.md has the plan): the forward of
// Algorithm 1 on Hopper's warpgroup MMA, before it moves into flash_attention.cu. One block
// of one warpgroup (4 warps) per 64 query rows, as Part II, with the tile products on wgmma:
//   S_ij = Q_i K_j^T: three chains of 8 wgmma m64n64k8 from shared memory (3xTF32), and
//   O_i += P_ij V_j: three chains with P from registers, V_j^T from shared memory.
// The block stages each K_j and V_j itself (load, split, store in wgmma's layout), then
// computes: nothing overlaps yet. It checks O and L against float64 on the CPU (small
// shapes, causal and not, odd lengths), then times B=2, H=8, N=4096.
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -o /tmp/hopper_forward benchmarks/hopper_forward.cu && /tmp/hopper_forward
#include <algorithm>
#include <cmath>
#include <vector>

#include "wgmma.cuh"

constexpr int d = 64, Br = 64, Bc = 64, THREADS = 128;
constexpr int TILE = 64 * 64;  // floats of one split part of a tile (wgmma's layout has no padding)
constexpr size_t SMEM = 6 * TILE * sizeof(float);  // Q_i, K_j, V_j^T, each big and small: 96 KB
constexpr float LOG2E = 1.4426950408889634f;

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// x = big + small (Part II's split): big is x rounded to TF32 (low 13 bits cleared), small
// the exact rest, of which the tensor cores read the top 11 bits.
__device__ __forceinline__ void split(float x, float& big, float& small) {
    big = __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
    small = x - big;
}

// Rows row0 .. row0 + 63 of an (N, 64) row-major matrix (zeros past N), split, as a wgmma
// operand with the rows as its rows and d as K. Each 8 lanes store one core matrix.
__device__ void stage_rows(float* big, float* small, const float* src, int row0, int N) {
    for (int f = threadIdx.x; f < 64 * 16; f += THREADS) {
        const int r = 8 * (f / 128) + f % 8, c = f / 8 % 16;  // row r, floats 4c .. 4c + 3
        const float4 x = row0 + r < N ? *reinterpret_cast<const float4*>(src + (int64_t)(row0 + r) * d + 4 * c)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
        float4 b, s;
        split(x.x, b.x, s.x);
        split(x.y, b.y, s.y);
        split(x.z, b.z, s.z);
        split(x.w, b.w, s.w);
        const int at = element_at(kgroup_major, r, 4 * c, 64, 64);
        *reinterpret_cast<float4*>(big + at) = b;
        *reinterpret_cast<float4*>(small + at) = s;
    }
}

// P's accumulator fragment holds keys 8s + 2t and 8s + 2t + 1 where wgmma's A fragment has
// k = t and t + 4 (see p_fragment): V^T's K position of key `key` within its group of 8.
__device__ __forceinline__ int k_position(int key) { return (key & ~7) | ((key & 1) << 2) | (key % 8 / 2); }

// V_j (rows row0 .. row0 + 63 of an (N, 64) matrix, zeros past N) as the B operand of P V:
// V_j^T, rows = d, K = keys in k_position order, split.
__device__ void stage_transposed(float* big, float* small, const float* src, int row0, int N) {
    for (int f = threadIdx.x; f < 64 * 16; f += THREADS) {
        const int key = f % 64, c = f / 64;  // key, floats 4c .. 4c + 3
        const float4 x = row0 + key < N ? *reinterpret_cast<const float4*>(src + (int64_t)(row0 + key) * d + 4 * c)
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
        const float xs[4] = {x.x, x.y, x.z, x.w};
        const int p = k_position(key);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int at = element_at(kgroup_major, 4 * c + e, p, 64, 64);
            split(xs[e], big[at], small[at]);
        }
    }
}

__device__ __forceinline__ uint64_t tile_step(const float* tile, int s) { return step_descriptor(tile, kgroup_major, 64, 64, s); }

// wgmma's A fragment of P for k-step s (keys 8s .. 8s + 7), split: from the accumulator
// fragment, lane (g, t) holds P[g][8s + 2t], P[g][8s + 2t + 1], P[g + 8][...] in S[4s .. 4s + 3];
// A wants (g, k = t), (g + 8, t), (g, t + 4), (g + 8, t + 4): keys 2t -> k = t, 2t + 1 -> t + 4.
__device__ __forceinline__ void p_fragment(uint32_t (&big)[4], uint32_t (&small)[4], const float (&S)[32], int s) {
    const float p[4] = {S[4 * s], S[4 * s + 2], S[4 * s + 1], S[4 * s + 3]};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float b, sm;
        split(p[e], b, sm);
        big[e] = __float_as_uint(b);
        small[e] = __float_as_uint(sm);
    }
}

// One block per (query tile i, head bh); q, k, v, o contiguous (BH, N, 64); L (BH, Nq).
__global__ void __launch_bounds__(THREADS) forward_kernel(const float* q, const float* k, const float* v, float* o,
                                                          float* L, int Nq, int Nk, float softmax_scale, bool causal) {
    extern __shared__ __align__(128) float smem[];
    float *Q_big = smem, *Q_small = smem + TILE, *K_big = smem + 2 * TILE, *K_small = smem + 3 * TILE;
    float *Vt_big = smem + 4 * TILE, *Vt_small = smem + 5 * TILE;
    const int Tr = cdiv(Nq, Br), Tc = cdiv(Nk, Bc);
    const int i = Tr - 1 - blockIdx.x;  // the query tiles with the most work first
    const int64_t bh = blockIdx.y;
    q += bh * Nq * d;
    k += bh * Nk * d;
    v += bh * Nk * d;
    o += bh * Nq * d;
    L += bh * Nq;
    const int w = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const float scale_log2 = softmax_scale * LOG2E;
    const int last_row = min((i + 1) * Br, Nq) - 1;
    const int Tc_end = causal ? min(Tc, last_row / Bc + 1) : Tc;

    stage_rows(Q_big, Q_small, q, i * Br, Nq);  // line 4
    float O[32] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // line 5

    for (int j = 0; j < Tc_end; ++j) {  // line 6
        __syncthreads();                // every warp's products of tile j - 1 are done
        stage_rows(K_big, K_small, k, j * Bc, Nk);  // line 7
        stage_transposed(Vt_big, Vt_small, v, j * Bc, Nk);
        fence_proxy_async();
        __syncthreads();

        float S[32];  // line 8: S_ij = Q_i K_j^T, the small cross terms first
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 8; ++s) wgmma_ss(S, tile_step(Q_small, s), tile_step(K_big, s), s > 0);
#pragma unroll
        for (int s = 0; s < 8; ++s) wgmma_ss(S, tile_step(Q_big, s), tile_step(K_small, s), 1);
#pragma unroll
        for (int s = 0; s < 8; ++s) wgmma_ss(S, tile_step(Q_big, s), tile_step(K_big, s), 1);
        wgmma_commit();
        wgmma_wait_all();

        // line 9: scale (base 2), mask, online softmax; S becomes P~ in place
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = i * Br + 16 * w + g + 8 * h;
            float row_max = m[h];
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = j * Bc + 8 * n + 2 * t + e;
                    float& x = S[4 * n + 2 * h + e];
                    x = key >= Nk || (causal && key > row) ? -INFINITY : x * scale_log2;
                    row_max = fmaxf(row_max, x);
                }
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
            row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
            const float alpha = exp2f(m[h] - row_max);
            m[h] = row_max;
            l[h] *= alpha;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = S[4 * n + 2 * h + e];
                    x = exp2f(x - row_max);
                    l[h] += x;
                    O[4 * n + 2 * h + e] *= alpha;
                }
        }

        float pv[32];  // line 10: O_i += P~_ij V_j, summed apart and added in FP32
        uint32_t P_big[8][4], P_small[8][4];
#pragma unroll
        for (int s = 0; s < 8; ++s) p_fragment(P_big[s], P_small[s], S, s);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 8; ++s) wgmma_rs(pv, P_small[s], tile_step(Vt_big, s), s > 0);
#pragma unroll
        for (int s = 0; s < 8; ++s) wgmma_rs(pv, P_big[s], tile_step(Vt_small, s), 1);
#pragma unroll
        for (int s = 0; s < 8; ++s) wgmma_rs(pv, P_big[s], tile_step(Vt_big, s), 1);
        wgmma_commit();
        wgmma_wait_all();
#pragma unroll
        for (int e = 0; e < 32; ++e) O[e] += pv[e];
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {  // lines 12-15
        float l_row = l[h] + __shfl_xor_sync(0xffffffffu, l[h], 1);
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = i * Br + 16 * w + g + 8 * h;
        if (row >= Nq) continue;
        const float inv_l = 1.f / l_row;
#pragma unroll
        for (int n = 0; n < 8; ++n)
            *reinterpret_cast<float2*>(o + (int64_t)row * d + 8 * n + 2 * t) =
                make_float2(O[4 * n + 2 * h] * inv_l, O[4 * n + 2 * h + 1] * inv_l);
        if (t == 0) L[row] = m[h] / LOG2E + logf(l_row);
    }
}

struct Problem {
    int BH, Nq, Nk;
    bool causal;
    std::vector<float> q, k, v;
};

Problem random_problem(int BH, int Nq, int Nk, bool causal, unsigned seed) {
    srand(seed);
    Problem p{BH, Nq, Nk, causal, {}, {}, {}};
    auto fill = [](std::vector<float>& x, size_t n) {
        x.resize(n);
        for (float& e : x) {  // normal by Box-Muller
            const double u1 = (rand() + 1.0) / (RAND_MAX + 2.0), u2 = rand() / (RAND_MAX + 1.0);
            e = (float)(sqrt(-2 * log(u1)) * cos(2 * M_PI * u2));
        }
    };
    fill(p.q, (size_t)BH * Nq * d);
    fill(p.k, (size_t)BH * Nk * d);
    fill(p.v, (size_t)BH * Nk * d);
    return p;
}

// Runs the kernel; returns its median time in ms over `reps` launches (0: one launch, untimed).
float run(const Problem& p, std::vector<float>& O, std::vector<float>& Lse, int reps) {
    float *q, *k, *v, *o, *L;
    const size_t nq = (size_t)p.BH * p.Nq * d, nk = (size_t)p.BH * p.Nk * d;
    CHECK(cudaMalloc(&q, nq * 4));
    CHECK(cudaMalloc(&k, nk * 4));
    CHECK(cudaMalloc(&v, nk * 4));
    CHECK(cudaMalloc(&o, nq * 4));
    CHECK(cudaMalloc(&L, (size_t)p.BH * p.Nq * 4));
    CHECK(cudaMemcpy(q, p.q.data(), nq * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(k, p.k.data(), nk * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(v, p.v.data(), nk * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemset(o, 0xff, nq * 4));  // NaN: an element left unwritten shows
    CHECK(cudaFuncSetAttribute(forward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM));
    const dim3 grid(cdiv(p.Nq, Br), p.BH);
    auto launch = [&] {
        forward_kernel<<<grid, THREADS, SMEM>>>(q, k, v, o, L, p.Nq, p.Nk, 0.125f, p.causal);
        CHECK(cudaGetLastError());
    };
    launch();
    CHECK(cudaDeviceSynchronize());
    std::vector<float> times;
    cudaEvent_t start, end;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&end));
    for (int r = 0; r < reps; ++r) {
        CHECK(cudaEventRecord(start));
        launch();
        CHECK(cudaEventRecord(end));
        CHECK(cudaEventSynchronize(end));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, end));
        times.push_back(ms);
    }
    O.resize(nq);
    Lse.resize((size_t)p.BH * p.Nq);
    CHECK(cudaMemcpy(O.data(), o, nq * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(Lse.data(), L, Lse.size() * 4, cudaMemcpyDeviceToHost));
    for (float* x : {q, k, v, o, L}) CHECK(cudaFree(x));
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(end));
    if (times.empty()) return 0.f;
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// max |O - O64| and max |L - L64| against attention in float64.
bool check(int BH, int Nq, int Nk, bool causal) {
    const Problem p = random_problem(BH, Nq, Nk, causal, 1234 + Nq + Nk);
    std::vector<float> O, Lse;
    run(p, O, Lse, 0);
    double err_o = 0, err_l = 0;
    std::vector<double> s(Nk);
    for (int bh = 0; bh < BH; ++bh)
        for (int r = 0; r < Nq; ++r) {
            double mx = -INFINITY;
            for (int c = 0; c < Nk; ++c) {
                double x = 0;
                for (int e = 0; e < d; ++e) x += (double)p.q[((size_t)bh * Nq + r) * d + e] * p.k[((size_t)bh * Nk + c) * d + e];
                s[c] = causal && c > r ? -INFINITY : x * 0.125;
                mx = fmax(mx, s[c]);
            }
            double sum = 0;
            for (int c = 0; c < Nk; ++c) sum += s[c] = exp(s[c] - mx);
            for (int e = 0; e < d; ++e) {
                double x = 0;
                for (int c = 0; c < Nk; ++c) x += s[c] * p.v[((size_t)bh * Nk + c) * d + e];
                const double got = O[((size_t)bh * Nq + r) * d + e];
                err_o = std::isnan(got) ? INFINITY : fmax(err_o, fabs(got - x / sum));
            }
            err_l = fmax(err_l, fabs(Lse[(size_t)bh * Nq + r] - (mx + log(sum))));
        }
    const bool ok = err_o < 1e-5 && err_l < 1e-5;
    printf("check BH=%d Nq=%d Nk=%d causal=%d: max err O %.2e, L %.2e  %s\n", BH, Nq, Nk, causal, err_o, err_l,
           ok ? "ok" : "WRONG");
    return ok;
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s\n", prop.name);
    if (prop.major != 9) {
        printf("wgmma needs an sm_90 GPU (H100, H200)\n");
        return 1;
    }
    bool ok = true;
    for (bool causal : {false, true}) {
        ok &= check(2, 64, 64, causal);
        ok &= check(3, 200, 200, causal);
        ok &= check(2, 100, 37, causal);
        ok &= check(2, 37, 300, causal);
    }
    std::vector<float> O, Lse;
    for (bool causal : {false, true}) {
        const Problem p = random_problem(16, 4096, 4096, causal, 7);
        const float ms = run(p, O, Lse, 20);
        const double flop = 4.0 * 16 * 4096.0 * 4096.0 * d / (causal ? 2 : 1);
        printf("B*H=16, N=4096, causal=%d: %.3f ms, %.1f TFLOP/s\n", causal, ms, flop / ms / 1e9);
    }
    return ok ? 0 : 1;
}
