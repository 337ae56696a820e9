// Part III's forward (flash_attention.cu, namespace hopper) without PyTorch: checked against
// float64 on the CPU (small shapes, causal and not, odd lengths, (B, N, H, 64) strides, NaN
// and Inf inputs), then timed at B*H = 16, N = 512 and 4096 beside Part II's forward. Its
// prototype versions, measured, are in benchmarks/NOTES.md (v12, v13).
//   nvcc -gencode arch=compute_90a,code=sm_90a -DFLASH_ATTENTION_SM90A -O3 -o /tmp/hopper_forward benchmarks/hopper_forward.cu && timeout 60 /tmp/hopper_forward
//   ncu --set full -k regex:forward_kernel /tmp/hopper_forward profile   (both forwards, twice each, unchecked)
//   compute-sanitizer --tool racecheck /tmp/hopper_forward check   (the checks alone, untimed)
//   /tmp/hopper_forward dump FILE   (Part III's O and L of two problems, raw floats: cmp two builds' files)
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../flash_attention.cu"
#include "wgmma.cuh"  // CHECK
#include "layouts.cuh"

using flash::d;
using flash::Tensor4;

// --- host -------------------------------------------------------------------------------

struct Problem {
    int BH, Nq, Nk;
    bool causal;
    std::vector<float> q, k, v;  // (B * H, N, 64), contiguous
    bool bnhd = false;           // on the GPU as (B, N, H, 64) tensors with H = 2 (nanoGPT's strides)
};

Problem random_problem(int BH, int Nq, int Nk, bool causal, unsigned seed) {
    srand(seed);
    Problem p{BH, Nq, Nk, causal, {}, {}, {}, false};
    auto fill = [](std::vector<float>& x, size_t n) {
        x.resize(n);
        for (float& e : x) {  // normal, by Box-Muller
            const double u1 = (rand() + 1.0) / (RAND_MAX + 2.0), u2 = rand() / (RAND_MAX + 1.0);
            e = (float)(sqrt(-2 * log(u1)) * cos(2 * M_PI * u2));
        }
    };
    fill(p.q, (size_t)BH * Nq * d);
    fill(p.k, (size_t)BH * Nk * d);
    fill(p.v, (size_t)BH * Nk * d);
    return p;
}

// Runs Part `part` (2: fast, 3: hopper) once, then `reps` more times between CUDA events;
// returns the median time in ms (0 when reps = 0) and leaves O and L in the vectors. Part III:
// consumers = 1 or 2 forces that block shape, 0 leaves it to forward().
float run(int part, const Problem& p, std::vector<float>& O, std::vector<float>& Lse, int reps, int consumers = 0) {
    float *q, *k, *v, *o, *L;
    const size_t nq = (size_t)p.BH * p.Nq * d, nk = (size_t)p.BH * p.Nk * d;
    CHECK(cudaMalloc(&q, nq * 4));
    CHECK(cudaMalloc(&k, nk * 4));
    CHECK(cudaMalloc(&v, nk * 4));
    CHECK(cudaMalloc(&o, nq * 4));
    CHECK(cudaMalloc(&L, (size_t)p.BH * p.Nq * 4));
    const Tensor4<float> Q = layout(q, p.Nq, p.bnhd), K = layout(k, p.Nk, p.bnhd), V = layout(v, p.Nk, p.bnhd),
                         Out = layout(o, p.Nq, p.bnhd);
    to_gpu(Q, p.q, p.BH, p.Nq);
    to_gpu(K, p.k, p.BH, p.Nk);
    to_gpu(V, p.v, p.BH, p.Nk);
    CHECK(cudaMemset(o, 0xff, nq * 4));  // NaN: an element left unwritten shows
    auto launch = [&] {
        const auto forward = part == 2 ? flash::fast::forward : consumers == 1 ? flash::hopper::launch<1>
                             : consumers == 2 ? flash::hopper::launch<2> : flash::hopper::forward;
        CHECK(forward(in(Q), in(K), in(V), Out, L, p.BH, p.Nq, p.Nk, 0.125f, p.causal, 0));
    };
    const float ms = median_ms(launch, reps);
    O.resize(nq);
    Lse.resize((size_t)p.BH * p.Nq);
    from_gpu(O, Out, p.BH, p.Nq);
    CHECK(cudaMemcpy(Lse.data(), L, Lse.size() * 4, cudaMemcpyDeviceToHost));
    for (float* x : {q, k, v, o, L}) CHECK(cudaFree(x));
    return ms;
}

// max |O - O64| and max |L - L64| against attention in float64 (Part II's errors: ~1e-6).
// poison: 1, 2, 3 put a NaN into V, an Inf into V, a NaN into K at (head 0, key Nk - 1,
// column 7); where the float64 result is NaN or Inf the kernel's must be non-finite too, and
// nowhere else (the contract: a bad value reaches exactly the rows that see it; Part II gives
// NaN for an Inf in V, since split(Inf) has a NaN small part, and Part III gives the Inf).
bool check(int part, int BH, int Nq, int Nk, bool causal, int poison = 0, bool bnhd = false) {
    Problem p = random_problem(BH, Nq, Nk, causal, 1234 + Nq + Nk);
    p.bnhd = bnhd;
    const size_t poisoned = (size_t)(Nk - 1) * d + 7;
    if (poison == 1) p.v[poisoned] = NAN;
    if (poison == 2) p.v[poisoned] = INFINITY;
    if (poison == 3) p.k[poisoned] = NAN;
    std::vector<float> O, Lse;
    run(part, p, O, Lse, 0);
    // |got - want|, 0 when both are non-finite, infinite when only one is
    auto error = [](double got, double want) {
        const bool bad_got = !std::isfinite(got), bad_want = !std::isfinite(want);
        if (bad_got || bad_want) return bad_got && bad_want ? 0.0 : INFINITY;
        return fabs(got - want);
    };
    double err_o = 0, err_l = 0;
    std::vector<double> s(Nk);
    for (int bh = 0; bh < BH; ++bh)
        for (int r = 0; r < Nq; ++r) {
            double mx = -INFINITY;
            bool nan_score = false;
            for (int c = 0; c < Nk; ++c) {
                double x = 0;
                for (int e = 0; e < d; ++e) x += (double)p.q[((size_t)bh * Nq + r) * d + e] * p.k[((size_t)bh * Nk + c) * d + e];
                s[c] = causal && c > r ? -INFINITY : x * 0.125;
                nan_score |= std::isnan(s[c]);
                if (!std::isnan(s[c])) mx = fmax(mx, s[c]);
            }
            double sum = 0;
            for (int c = 0; c < Nk; ++c) sum += s[c] = exp(s[c] - mx);
            for (int e = 0; e < d; ++e) {
                double x = 0;
                for (int c = 0; c < Nk; ++c)
                    if (!(causal && c > r)) x += s[c] * p.v[((size_t)bh * Nk + c) * d + e];  // hidden keys: no term
                err_o = fmax(err_o, error(O[((size_t)bh * Nq + r) * d + e], nan_score ? NAN : x / sum));
            }
            err_l = fmax(err_l, error(Lse[(size_t)bh * Nq + r], nan_score ? NAN : mx + log(sum)));
        }
    const bool ok = err_o < 1e-5 && err_l < 1e-5;
    const char* what[] = {"", ", NaN in V", ", Inf in V", ", NaN in K"};
    printf("Part %s, BH=%d Nq=%d Nk=%d causal=%d%s%s: max err O %.2e, L %.2e  %s\n", part == 3 ? "III" : "II", BH,
           Nq, Nk, causal,
           what[poison], bnhd ? ", (B, N, H, 64) strides" : "", err_o, err_l, ok ? "ok" : "WRONG");
    return ok;
}

int main(int argc, char** argv) {
    if (!runs_wgmma()) return 1;
    if (argc > 1 && std::string(argv[1]) == "profile") {  // for ncu: Parts II and III twice each, no checks
        std::vector<float> O, Lse;
        const Problem p = random_problem(16, 4096, 4096, false, 7);
        for (int part : {2, 3}) printf("Part %d: %.3f ms\n", part, run(part, p, O, Lse, 1));
        return 0;
    }
    if (argc > 2 && std::string(argv[1]) == "dump") {  // Part III's O and L, raw, to compare two builds
        FILE* f = fopen(argv[2], "wb");
        for (bool causal : {false, true}) {
            std::vector<float> O, Lse;
            run(3, random_problem(3, 300, 320, causal, 5), O, Lse, 0);
            fwrite(O.data(), 4, O.size(), f);
            fwrite(Lse.data(), 4, Lse.size(), f);
        }
        return fclose(f) == 0 ? 0 : 1;
    }
    bool ok = true;
    for (int part : {2, 3})
        for (bool causal : {false, true}) {
            ok &= check(part, 2, 64, 64, causal);
            ok &= check(part, 3, 200, 200, causal);
            ok &= check(part, 2, 100, 37, causal);
            ok &= check(part, 2, 37, 300, causal);
            ok &= check(part, 1, 300, 130, causal);
            ok &= check(part, 4, 200, 130, causal, 0, true);
            for (int poison = 1; poison <= 3; ++poison) ok &= check(part, 2, 200, 200, causal, poison);
        }
    for (bool causal : {false, true})  // one block shape or the other: the same bits
        for (int N : {37, 200, 300}) {
            const Problem p = random_problem(3, N, N + 20, causal, 99 + N);
            std::vector<float> O1, L1, O2, L2;
            run(3, p, O1, L1, 0, 1);
            run(3, p, O2, L2, 0, 2);
            const bool same = !memcmp(O1.data(), O2.data(), O1.size() * 4) && !memcmp(L1.data(), L2.data(), L1.size() * 4);
            printf("Part III, 64- and 128-row blocks, BH=3 Nq=%d Nk=%d causal=%d: %s\n", N, N + 20, causal,
                   same ? "bit-identical ok" : "DIFFER");
            ok &= same;
        }
    if (argc > 1 && std::string(argv[1]) == "check") return ok ? 0 : 1;
    std::vector<float> O, Lse;
    for (int N : {128, 512, 4096})  // N = 512: a short row of the grid, where few blocks leave SMs idle
        for (int part : {2, 3})
            for (bool causal : {false, true}) {
                const Problem p = random_problem(16, N, N, causal, 7);
                const float ms = run(part, p, O, Lse, 20);
                const double flop = 4.0 * 16 * (double)N * N * d / (causal ? 2 : 1);
                printf("Part %d, B*H=16, N=%d, causal=%d: %.3f ms, %.1f TFLOP/s\n", part, N, causal, ms,
                       flop / ms / 1e9);
            }
    return ok ? 0 : 1;
}
