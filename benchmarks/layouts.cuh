// (B * H, N, 64) rows on the host, to and from flash_attention.cu's Tensor4 layouts on the
// GPU: contiguous, or as (B, N, H, 64) tensors with H = 2 (nanoGPT's strides). For the
// harnesses of Part III (hopper_forward.cu, hopper_backward.cu); include it after
// flash_attention.cu and wgmma.cuh (CHECK).
#pragma once
#include <vector>

// Where element (bh, r, e) of an (B * H, N, 64) tensor lives on the GPU.
inline flash::Tensor4<float> layout(float* data, int N, bool bnhd) {
    constexpr int d = flash::d;
    const int H = bnhd ? 2 : 1;
    return bnhd ? flash::Tensor4<float>{data, (int64_t)N * H * d, d, H * d, H}
                : flash::Tensor4<float>{data, (int64_t)N * d, 0, d, 1};
}
// t as a kernel's input.
inline flash::In in(flash::Tensor4<float> t) { return flash::In{t.data, t.batch_stride, t.head_stride, t.row_stride, t.H}; }

// Where head bh of t starts (Tensor4::head, on the host).
inline float* head_start(flash::Tensor4<float> t, int bh) {
    return t.data + bh / t.H * t.batch_stride + bh % t.H * t.head_stride;
}

// Between the host's (B * H, N, 64) rows and t's layout on the GPU: a 2-D copy per head.
inline void to_gpu(flash::Tensor4<float> t, const std::vector<float>& x, int BH, int N) {
    constexpr int d = flash::d;
    for (int bh = 0; bh < BH; ++bh)
        CHECK(cudaMemcpy2D(head_start(t, bh), t.row_stride * sizeof(float), x.data() + (size_t)bh * N * d,
                           d * sizeof(float), d * sizeof(float), N, cudaMemcpyHostToDevice));
}
inline void from_gpu(std::vector<float>& x, flash::Tensor4<float> t, int BH, int N) {
    constexpr int d = flash::d;
    x.resize((size_t)BH * N * d);
    for (int bh = 0; bh < BH; ++bh)
        CHECK(cudaMemcpy2D(x.data() + (size_t)bh * N * d, d * sizeof(float), head_start(t, bh),
                           t.row_stride * sizeof(float), d * sizeof(float), N, cudaMemcpyDeviceToHost));
}
