// Warpgroup MMA (wgmma) on TF32 operands for sm_90a: the operand layouts in shared memory,
// their descriptors, and the instructions, shared by the Hopper benchmarks of this folder
// (wgmma_tf32.cu, hopper_backward.cu; hopper_forward.cu, a harness of flash_attention.cu's
// Part III, takes only the error check and the timer). flash_attention.cu does not include it.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                           \
    do {                                                                                      \
        const cudaError_t err = (call);                                                       \
        if (err != cudaSuccess) {                                                             \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err));     \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

// Prints the GPU's name; whether it runs wgmma (compute capability 9.0), saying so if not.
inline bool runs_wgmma() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("%s\n", prop.name);
    if (prop.major != 9) printf("wgmma needs an sm_90 GPU (H100, H200)\n");
    return prop.major == 9;
}

// Runs launch() once, then `reps` more times between CUDA events; returns the median time in
// ms (0 when reps = 0).
template <typename Launch>
float median_ms(Launch launch, int reps) {
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
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(end));
    if (times.empty()) return 0.f;
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

// x = big + small (Part II's split): big is x rounded to TF32 (low 13 bits cleared), small
// the exact rest, of which the tensor cores read the top 11 bits.
__device__ __forceinline__ void split(float x, float& big, float& small) {
    big = __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
    small = x - big;
}

// --- operand layouts ---------------------------------------------------------------------
// With TF32 operands wgmma reads both A and B "K-major" only (the transpose bits exist for
// 16-bit types): row r of an operand holds its K values. For S = Q K^T both Q and K are
// that already (K = d); for O = P V the B operand is V^T (rows = d, K = keys).
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

// wgmma's A fragment of k-step s, split, from an accumulator fragment x (64 x N, the layout
// above): lane (g, t) holds D[g][8s + 2t], D[g][8s + 2t + 1], D[g + 8][8s + 2t], D[g + 8][8s + 2t + 1]
// in x[4s .. 4s + 3], and A wants (g, k = t), (g + 8, t), (g, t + 4), (g + 8, t + 4). So the
// B operand keeps its K of each 8 in that order: 2u at position u, 2u + 1 at u + 4.
template <int N>
__device__ __forceinline__ void a_from_accumulator(uint32_t (&big)[4], uint32_t (&small)[4], const float (&x)[N],
                                                   int s) {
    const float v[4] = {x[4 * s], x[4 * s + 2], x[4 * s + 1], x[4 * s + 3]};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float b, sm;
        split(v[e], b, sm);
        big[e] = __float_as_uint(b);
        small[e] = __float_as_uint(sm);
    }
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
