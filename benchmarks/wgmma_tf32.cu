// The tensor cores' warpgroup MMA (wgmma) on TF32 operands, measured before Part III of
// flash_attention.cu is built on it (issue 15, benchmarks/NOTES.md). On an H100 or H200:
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -o /tmp/wgmma_tf32 benchmarks/wgmma_tf32.cu && /tmp/wgmma_tf32
// 1. The layouts: D = A B^T from shared memory (both operands) and with A from registers,
//    for the two ways of placing an operand's core matrices that the descriptor can
//    describe, against the same product on the CPU.
// 2. The rate, TFLOP/s of TF32 products (3xTF32 costs three of them per FP32 product): one
//    block per SM of 1-3 warpgroups, each running chains of 8 wgmma (a 64-deep product, as
//    S = Q K^T with d = 64 is) on random data, from shared memory or with A from registers.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(call)                                                                           \
    do {                                                                                      \
        const cudaError_t err = (call);                                                       \
        if (err != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err));     \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// --- operand layouts ---------------------------------------------------------------------
// wgmma reads a K-major operand without swizzle as core matrices of 8 rows x 16 bytes (4
// TF32 values), each 128 contiguous bytes. The descriptor gives the byte distance between
// core matrices adjacent in K (LBO, "leading") and adjacent in rows (SBO, "stride"). Two
// placements of the core matrices of a (rows x K) operand:
//   kgroup_major: core (row group g, k group c) at (c * rows / 8 + g) * 128 bytes:
//                 LBO = rows * 16, SBO = 128 (what a 3-D TMA box of (4, rows, K / 4) writes);
//   rowgroup_major: at (g * K / 4 + c) * 128 bytes: LBO = 128, SBO = K / 4 * 128 = K * 32.
enum Layout { kgroup_major = 0, rowgroup_major = 1 };

__host__ __device__ int element_at(Layout layout, int r, int k, int rows, int K) {
    const int core = layout == kgroup_major ? (k / 4) * (rows / 8) + r / 8 : (r / 8) * (K / 4) + k / 4;
    return core * 32 + (r % 8) * 4 + k % 4;
}
__host__ __device__ uint32_t lbo_bytes(Layout layout, int rows) { return layout == kgroup_major ? rows * 16 : 128; }
__host__ __device__ uint32_t sbo_bytes(Layout layout, int K) { return layout == kgroup_major ? 128 : K * 32; }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The matrix descriptor: start address, LBO and SBO in units of 16 bytes (bits 0-13,
// 16-29, 32-45); base offset 0 and swizzle mode 0 (none) in bits 49-51 and 62-63.
__device__ __forceinline__ uint64_t descriptor(const float* start, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((smem_addr(start) & 0x3FFFF) >> 4) | (uint64_t)(lbo >> 4) << 16 | (uint64_t)(sbo >> 4) << 32;
}
// The operand's k-step s (K columns 8s .. 8s + 7) starts at its element (0, 8s).
__device__ __forceinline__ uint64_t step_descriptor(const float* tile, Layout layout, int rows, int K, int s) {
    return descriptor(tile + element_at(layout, 0, 8 * s, rows, K), lbo_bytes(layout, rows), sbo_bytes(layout, K));
}

// --- wgmma ------------------------------------------------------------------------------
// The accumulator fragment of D (64 x N) in a warpgroup: warp w holds rows 16w .. 16w + 15;
// lane (g = lane / 4, t = lane % 4) holds, for each 8-column block n, d[4n .. 4n + 3] =
// D[16w + g][8n + 2t], D[16w + g][8n + 2t + 1], D[16w + g + 8][8n + 2t], D[16w + g + 8][8n + 2t + 1].
// accumulate = 0 overwrites D. The scale immediates of A and B are 1.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory (st.shared) become visible to wgmma (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D (64 x 64) += A B^T, A and B from shared memory (descriptors).
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
        ", %32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(accumulate));
}
// D (64 x 64) += A B^T, A from registers (the mma.sync m16n8k8 A fragment, per warp), B from shared memory.
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
        ", {%32, %33, %34, %35}, %36, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// D (64 x 128) += A B^T, A and B from shared memory (descriptors).
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
        ", %64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(a), "l"(b), "r"(accumulate));
}
// D (64 x 128) += A B^T, A from registers (the mma.sync m16n8k8 A fragment, per warp), B from shared memory.
__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, "
        "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, "
        "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, "
        "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
        ", {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

// A's fragment for wgmma_rs, k-step s: lane (g, t) of warp w holds A[16w + g][8s + t],
// A[16w + g + 8][8s + t], A[16w + g][8s + t + 4], A[16w + g + 8][8s + t + 4].
__device__ __forceinline__ void a_fragment(uint32_t (&a)[4], const float* A, Layout layout, int K, int s) {
    const int w = threadIdx.x % 128 / 32, g = threadIdx.x % 32 / 4, t = threadIdx.x % 4, r = 16 * w + g, k = 8 * s + t;
    a[0] = __float_as_uint(A[element_at(layout, r, k, 64, K)]);
    a[1] = __float_as_uint(A[element_at(layout, r + 8, k, 64, K)]);
    a[2] = __float_as_uint(A[element_at(layout, r, k + 4, 64, K)]);
    a[3] = __float_as_uint(A[element_at(layout, r + 8, k + 4, 64, K)]);
}

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

bool check(Layout layout, bool a_in_registers) {
    std::vector<float> A(64 * CHECK_K), B(64 * CHECK_K), D(64 * 64);
    for (float& x : A) x = random_tf32();
    for (float& x : B) x = random_tf32();
    float *dA, *dB, *dD;
    CHECK(cudaMalloc(&dA, A.size() * 4));
    CHECK(cudaMalloc(&dB, B.size() * 4));
    CHECK(cudaMalloc(&dD, D.size() * 4));
    CHECK(cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice));
    check_kernel<<<1, 128>>>(dA, dB, dD, layout, a_in_registers);
    CHECK(cudaGetLastError());
    CHECK(cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (int m = 0; m < 64; ++m)
        for (int n = 0; n < 64; ++n) {
            double ref = 0;
            for (int k = 0; k < CHECK_K; ++k) ref += (double)A[m * CHECK_K + k] * B[n * CHECK_K + k];
            worst = fmax(worst, fabs(D[m * 64 + n] - ref));
        }
    CHECK(cudaFree(dA));
    CHECK(cudaFree(dB));
    CHECK(cudaFree(dD));
    const bool ok = worst < 1e-5;
    printf("layout %-14s A from %-9s: max |D - D_cpu| = %.2e  %s\n",
           layout == kgroup_major ? "kgroup_major" : "rowgroup_major", a_in_registers ? "registers" : "smem", worst,
           ok ? "ok" : "WRONG");
    return ok;
}

// --- 2. rate -------------------------------------------------------------------------------
constexpr int RATE_K = 64;  // the depth of one chain of products: d = 64
constexpr Layout RATE_LAYOUT = kgroup_major;

// Each warpgroup: its own A (64 x 64), the block's B (N x 64), `chains` chains of 8 wgmma
// into one accumulator, waiting for each chain to finish before the next starts.
template <int N, bool a_in_registers>
__global__ void rate_kernel(float* sink, int chains) {
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
    for (int c = 0; c < chains; ++c) {
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < RATE_K / 8; ++s) {
            const uint64_t b = step_descriptor(Bs, RATE_LAYOUT, N, RATE_K, s);
            if constexpr (a_in_registers) wgmma_rs(d, a[s], b, s > 0);
            else wgmma_ss(d, step_descriptor(As, RATE_LAYOUT, 64, RATE_K, s), b, s > 0);
        }
        wgmma_commit();
        wgmma_wait_all();
    }
    float sum = 0.f;
    for (int i = 0; i < N / 2; ++i) sum += d[i];
    if (sum == 12345.f) sink[threadIdx.x] = sum;  // keeps the products alive
}

template <int N, bool a_in_registers>
void rate(int warpgroups, int sms, float* sink) {
    const int threads = 128 * warpgroups, chains = 4000;
    const size_t bytes = (size_t)(N + 64 * warpgroups) * RATE_K * sizeof(float);
    CHECK(cudaFuncSetAttribute(rate_kernel<N, a_in_registers>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    rate_kernel<N, a_in_registers><<<sms, threads, bytes>>>(sink, chains / 10);  // warm-up
    CHECK(cudaGetLastError());
    cudaEvent_t start, end;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&end));
    float best_ms = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaEventRecord(start));
        rate_kernel<N, a_in_registers><<<sms, threads, bytes>>>(sink, chains);
        CHECK(cudaEventRecord(end));
        CHECK(cudaEventSynchronize(end));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, end));
        best_ms = fminf(best_ms, ms);
    }
    const double flop = 2.0 * 64 * N * RATE_K * (double)chains * warpgroups * sms;
    printf("m64n%dk8, A from %-9s, %d warpgroup%s per SM: %6.1f TFLOP/s (TF32)\n", N,
           a_in_registers ? "registers" : "smem", warpgroups, warpgroups > 1 ? "s" : " ", flop / best_ms / 1e9);
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
    float* sink;
    CHECK(cudaMalloc(&sink, 1024 * sizeof(float)));
    for (int warpgroups = 1; warpgroups <= 3; ++warpgroups) {
        rate<64, false>(warpgroups, prop.multiProcessorCount, sink);
        rate<64, true>(warpgroups, prop.multiProcessorCount, sink);
        rate<128, false>(warpgroups, prop.multiProcessorCount, sink);
        rate<128, true>(warpgroups, prop.multiProcessorCount, sink);
    }
    CHECK(cudaFree(sink));
    return ok ? 0 : 1;
}
