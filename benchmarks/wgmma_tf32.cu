// The tensor cores' warpgroup MMA (wgmma) on TF32 operands, measured before Part III of
// flash_attention.cu is built on it (issue 15, benchmarks/NOTES.md). On an H100 or H200:
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -o /tmp/wgmma_tf32 benchmarks/wgmma_tf32.cu && /tmp/wgmma_tf32
// 1. The layouts: D = A B^T from shared memory (both operands) and with A from registers,
//    for the two ways of placing an operand's core matrices that the descriptor can
//    describe, against the same product on the CPU; and what wgmma makes of FP32 values
//    that are not TF32 values (truncated or rounded), printed.
// 2. The rate, TFLOP/s of TF32 products (3xTF32 costs three of them per FP32 product): one
//    block per SM of 1-3 warpgroups, each running chains of 8 wgmma (a 64-deep product, as
//    S = Q K^T with d = 64 is) on random data, from shared memory or with A from registers;
//    and, independent of the clock rate, the FMA per SM clock that block 0 measured with
//    clock64 (a dense TF32 peak of 495 TFLOP/s at 1.83 GHz on 132 SMs is 1024).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "wgmma.cuh"

// --- 1. layouts --------------------------------------------------------------------------
constexpr int CHECK_K = 16;  // two k-steps: the second one tests the step's start address

// D (64 x 64) = A (64 x 16) B (64 x 16)^T by one warpgroup; A, B row-major in global memory.
__global__ void check_kernel(const float* A, const float* B, float* D, Layout layout, bool a_in_registers) {
    __shared__ __align__(128) float As[64 * CHECK_K], Bs[64 * CHECK_K];
    for (int i = threadIdx.x; i < 64 * CHECK_K; i += blockDim.x) {
        const int r = i / CHECK_K, k = i % CHECK_K;
        As[element_at(layout, r, k, 64, CHECK_K)] = A[i];
        Bs[element_at(layout, r, k, 64, CHECK_K)] = B[i];
    }
    fence_proxy_async();
    __syncthreads();
    float d[32];
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    uint32_t a[4];
    wgmma_fence();
    for (int s = 0; s < CHECK_K / 8; ++s) {
        const uint64_t b = step_descriptor(Bs, layout, 64, CHECK_K, s);
        if (a_in_registers) {
            a_fragment(a, As, layout, CHECK_K, s);
            wgmma_rs(d, a, b, 1);
        } else {
            wgmma_ss(d, step_descriptor(As, layout, 64, CHECK_K, s), b, 1);
        }
    }
    wgmma_commit();
    wgmma_wait_all();
    const int w = threadIdx.x / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (int n = 0; n < 8; ++n)
        for (int e = 0; e < 4; ++e) D[(16 * w + g + 8 * (e / 2)) * 64 + 8 * n + 2 * t + e % 2] = d[4 * n + e];
}

// A random number in [-1, 1) with the low 13 bits clear: a TF32 value, which the tensor
// cores multiply exactly.
float random_tf32() {
    float x = 2.f * rand() / RAND_MAX - 1.f;
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits &= 0xffffe000u;
    memcpy(&x, &bits, 4);
    return x;
}

// D = A B^T (A, B: 64 x CHECK_K, row-major) by check_kernel.
std::vector<float> product_on_gpu(const std::vector<float>& A, const std::vector<float>& B, Layout layout,
                                  bool a_in_registers) {
    std::vector<float> D(64 * 64);
    float *dA, *dB, *dD;
    CHECK(cudaMalloc(&dA, A.size() * 4));
    CHECK(cudaMalloc(&dB, B.size() * 4));
    CHECK(cudaMalloc(&dD, D.size() * 4));
    CHECK(cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice));
    check_kernel<<<1, 128>>>(dA, dB, dD, layout, a_in_registers);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaFree(dA));
    CHECK(cudaFree(dB));
    CHECK(cudaFree(dD));
    return D;
}

// max |D - A B^T|, the product in float64 of A and B with each value first passed through f.
template <typename F>
double error_against_cpu(const std::vector<float>& D, const std::vector<float>& A, const std::vector<float>& B, F f) {
    double worst = 0;
    for (int m = 0; m < 64; ++m)
        for (int n = 0; n < 64; ++n) {
            double ref = 0;
            for (int k = 0; k < CHECK_K; ++k) ref += (double)f(A[m * CHECK_K + k]) * f(B[n * CHECK_K + k]);
            worst = fmax(worst, fabs(D[m * 64 + n] - ref));
        }
    return worst;
}

bool check(Layout layout, bool a_in_registers) {
    std::vector<float> A(64 * CHECK_K), B(64 * CHECK_K);
    for (float& x : A) x = random_tf32();
    for (float& x : B) x = random_tf32();
    const double worst = error_against_cpu(product_on_gpu(A, B, layout, a_in_registers), A, B, [](float x) { return x; });
    const bool ok = worst < 1e-5;
    printf("layout %-14s A from %-9s: max |D - D_cpu| = %.2e  %s\n",
           layout == kgroup_major ? "kgroup_major" : "rowgroup_major", a_in_registers ? "registers" : "smem", worst,
           ok ? "ok" : "WRONG");
    return ok;
}

// What wgmma makes of FP32 values that are not TF32 values (low 13 bits set): the product
// against the CPU's with the operands truncated to TF32 (low bits cleared), rounded to
// nearest, and as they are. If the low bits are ignored, a raw FP32 tile in shared memory serves as its own
// big part in 3xTF32 (benchmarks/NOTES.md, the plan after v16). Printed only; no verdict.
void fp32_bits_read_as_tf32() {
    std::vector<float> A(64 * CHECK_K), B(64 * CHECK_K);
    for (float& x : A) x = 2.f * rand() / RAND_MAX - 1.f;
    for (float& x : B) x = 2.f * rand() / RAND_MAX - 1.f;
    auto to_tf32 = [](float x, uint32_t add) {
        uint32_t bits;
        memcpy(&bits, &x, 4);
        bits = (bits + add) & 0xffffe000u;
        memcpy(&x, &bits, 4);
        return x;
    };
    for (bool a_in_registers : {false, true}) {
        const std::vector<float> D = product_on_gpu(A, B, kgroup_major, a_in_registers);
        printf("FP32 operands (A from %-9s): max |D - D_cpu| with them truncated to TF32 %.2e, rounded %.2e, "
               "as they are %.2e\n",
               a_in_registers ? "registers" : "smem",
               error_against_cpu(D, A, B, [&](float x) { return to_tf32(x, 0); }),
               error_against_cpu(D, A, B, [&](float x) { return to_tf32(x, 0x1000u); }),
               error_against_cpu(D, A, B, [](float x) { return x; }));
    }
}

// --- 2. rate -------------------------------------------------------------------------------
constexpr int RATE_K = 64;  // the depth of one chain of products: d = 64
constexpr Layout RATE_LAYOUT = kgroup_major;

// Each warpgroup: its own A (64 x 64), the block's B (N x 64), `chains` chains of 8 wgmma
// adding into one accumulator, waiting for each chain to finish before the next starts.
template <int N, bool a_in_registers>
__global__ void rate_kernel(float* sink, long long* cycles, int chains) {
    extern __shared__ __align__(128) float smem[];
    const int warpgroups = blockDim.x / 128, wg = threadIdx.x / 128;
    float* Bs = smem;
    float* As = smem + N * RATE_K + wg * 64 * RATE_K;
    uint32_t seed = 0x9e3779b9u * (blockIdx.x * blockDim.x + threadIdx.x + 1);
    for (int i = threadIdx.x; i < (N + 64 * warpgroups) * RATE_K; i += blockDim.x) {
        seed = seed * 1664525u + 1013904223u;                      // random data: zeros would
        smem[i] = (float)(int)(seed >> 8) * (1.f / 8388608.f) - 1.f;  // draw less power
    }
    fence_proxy_async();
    __syncthreads();
    uint32_t a[RATE_K / 8][4];
    for (int s = 0; s < RATE_K / 8; ++s) a_fragment(a[s], As, RATE_LAYOUT, RATE_K, s);
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    __syncthreads();
    const long long start = clock64();
    for (int c = 0; c < chains; ++c) {
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < RATE_K / 8; ++s) {
            const uint64_t b = step_descriptor(Bs, RATE_LAYOUT, N, RATE_K, s);
            // Every chain adds into d: a chain that overwrote it would leave the previous
            // one's products unread, and ptxas drops such wgmma (3 in 4 chains, measured).
            if constexpr (a_in_registers) wgmma_rs(d, a[s], b, 1);
            else wgmma_ss(d, step_descriptor(As, RATE_LAYOUT, 64, RATE_K, s), b, 1);
        }
        wgmma_commit();
        wgmma_wait_all();
    }
    __syncthreads();
    if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
    float sum = 0.f;
    for (int i = 0; i < N / 2; ++i) sum += d[i];
    if (sum == 12345.f) sink[threadIdx.x] = sum;  // keeps the products alive
}

template <int N, bool a_in_registers>
void rate(int warpgroups, int sms, float* sink, long long* cycles) {
    const int threads = 128 * warpgroups, chains = 4000;
    const size_t bytes = (size_t)(N + 64 * warpgroups) * RATE_K * sizeof(float);
    CHECK(cudaFuncSetAttribute(rate_kernel<N, a_in_registers>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    rate_kernel<N, a_in_registers><<<sms, threads, bytes>>>(sink, cycles, chains / 10);  // warm-up
    CHECK(cudaGetLastError());
    cudaEvent_t start, end;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&end));
    float best_ms = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaEventRecord(start));
        rate_kernel<N, a_in_registers><<<sms, threads, bytes>>>(sink, cycles, chains);
        CHECK(cudaEventRecord(end));
        CHECK(cudaEventSynchronize(end));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, end));
        best_ms = fminf(best_ms, ms);
    }
    long long block0_cycles;
    CHECK(cudaMemcpy(&block0_cycles, cycles, sizeof(long long), cudaMemcpyDeviceToHost));
    const double fma_per_sm = 64.0 * N * RATE_K * (double)chains * warpgroups;
    printf("m64n%dk8, A from %-9s, %d warpgroup%s per SM: %6.1f TFLOP/s (TF32), %6.0f FMA per SM clock\n", N,
           a_in_registers ? "registers" : "smem", warpgroups, warpgroups > 1 ? "s" : " ",
           2 * fma_per_sm * sms / best_ms / 1e9, fma_per_sm / (double)block0_cycles);
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(end));
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
    if (prop.major != 9) {
        printf("wgmma needs an sm_90 GPU (H100, H200)\n");
        return 1;
    }
    bool ok = true;
    for (Layout layout : {kgroup_major, rowgroup_major})
        for (bool a_in_registers : {false, true}) ok &= check(layout, a_in_registers);
    fp32_bits_read_as_tf32();
    float* sink;
    long long* cycles;
    CHECK(cudaMalloc(&sink, 1024 * sizeof(float)));
    CHECK(cudaMalloc(&cycles, prop.multiProcessorCount * sizeof(long long)));
    for (int warpgroups = 1; warpgroups <= 3; ++warpgroups) {
        rate<64, false>(warpgroups, prop.multiProcessorCount, sink, cycles);
        rate<64, true>(warpgroups, prop.multiProcessorCount, sink, cycles);
        rate<128, false>(warpgroups, prop.multiProcessorCount, sink, cycles);
        rate<128, true>(warpgroups, prop.multiProcessorCount, sink, cycles);
    }
    CHECK(cudaFree(sink));
    CHECK(cudaFree(cycles));
    return ok ? 0 : 1;
}
