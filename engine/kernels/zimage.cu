// Fused CUDA kernels of the engine, compiled to PTX by engine/build.rs when the `cuda` feature is on.
// No CUDA headers are included: bf16 is handled as its raw 16 bits, FP8 conversion uses the PTX
// `cvt ... e4m3x2` instructions (sm_89 and newer only), so the file builds with any nvcc.

typedef unsigned short bf16_bits;

__device__ __forceinline__ float bf16_to_f32(bf16_bits v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

// Round to nearest even, NaN kept quiet: the same rounding as torch's float -> bfloat16.
__device__ __forceinline__ bf16_bits f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_bits)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_bits)(u >> 16);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// amax_bits[0] = max(amax_bits[0], the largest m of the block's threads); m >= 0. Non-negative
// floats order like their bits, so an integer atomicMax is a float max.
__device__ __forceinline__ void block_amax(float m, unsigned int* amax_bits) {
    m = warp_max(m);
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        m = warp_max(m);
        if (lane == 0) atomicMax(amax_bits, __float_as_uint(m));
    }
}

// amax_bits[0] = max(amax_bits[0], bits of max |x|); amax_bits must be zeroed before the first launch.
extern "C" __global__ void zimage_amax_bf16(const bf16_bits* __restrict__ x, unsigned long long n,
                                            unsigned int* __restrict__ amax_bits) {
    float m = 0.0f;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long n8 = n / 8;
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride) {
        uint4 v = x8[i];
        unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            m = fmaxf(m, fabsf(__uint_as_float(w[j] << 16)));
            m = fmaxf(m, fabsf(__uint_as_float(w[j] & 0xffff0000u)));
        }
    }
    for (unsigned long long i = n8 * 8 + (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        m = fmaxf(m, fabsf(bf16_to_f32(x[i])));
    }
    block_amax(m, amax_bits);
}

// E4M3 conversions exist from sm_89 (Ada, Hopper); the host refuses FP8 on older cards, so the
// fallback branch is never reached.
__device__ __forceinline__ unsigned short pack_e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}

// Per-tensor FP8 E4M3 quantization: scale = amax / 448 (E4M3's largest finite value), q = x / scale
// rounded to nearest and saturated. scale_out[0] receives the scale (the matmul multiplies it back).
// n must be a multiple of 8 (the host checks).
extern "C" __global__ void zimage_quantize_e4m3_bf16(const bf16_bits* __restrict__ x, unsigned long long n,
                                                     const unsigned int* __restrict__ amax_bits,
                                                     unsigned int* __restrict__ q, float* __restrict__ scale_out) {
    float amax = __uint_as_float(amax_bits[0]);
    float scale = fmaxf(amax, 1e-12f) / 448.0f;
    float inv = 1.0f / scale;
    if (blockIdx.x == 0 && threadIdx.x == 0) scale_out[0] = scale;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    uint2* q8 = reinterpret_cast<uint2*>(q);
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n / 8; i += stride) {
        uint4 v = x8[i];
        unsigned int w[4] = {v.x, v.y, v.z, v.w};
        unsigned int packed[2];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float a = __uint_as_float(w[2 * j] << 16) * inv;
            float b = __uint_as_float(w[2 * j] & 0xffff0000u) * inv;
            float c = __uint_as_float(w[2 * j + 1] << 16) * inv;
            float d = __uint_as_float(w[2 * j + 1] & 0xffff0000u) * inv;
            packed[j] = (unsigned int)pack_e4m3x2(a, b) | ((unsigned int)pack_e4m3x2(c, d) << 16);
        }
        q8[i] = make_uint2(packed[0], packed[1]);
    }
}

// Fused per-head RMSNorm (optional) + interleaved rotary embedding, in the (B, L, H, D) layout that
// the linear layers produce and flash attention consumes, so no transposes or dtype casts are
// materialized. One warp per (b, l, h) row; statistics and rotation in f32, one rounding to bf16.
// x: one token's H heads of d values every token_stride elements (token = b * L + l), so q, k or v
// can be read straight out of a fused qkv product; out: rows x d bf16, contiguous
// (row = (b * L + l) * H + h); weight: d f32 (ignored when has_weight == 0); cos, sin: L x d/2 f32.
extern "C" __global__ void zimage_qk_norm_rope_bf16(const bf16_bits* __restrict__ x, const float* __restrict__ weight,
                                                   const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                   bf16_bits* __restrict__ out, unsigned int rows,
                                                   unsigned int seq_len, unsigned int heads, unsigned int d,
                                                   unsigned long long token_stride, int has_weight, float eps) {
    unsigned int warps_per_block = blockDim.x >> 5;
    unsigned int row = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    unsigned int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16_bits* xr = x + (unsigned long long)(row / heads) * token_stride + (unsigned long long)(row % heads) * d;
    bf16_bits* outr = out + (unsigned long long)row * d;
    unsigned int l = (row / heads) % seq_len;
    const float* c = cos_t + (unsigned long long)l * (d / 2);
    const float* s = sin_t + (unsigned long long)l * (d / 2);
    float inv_rms = 1.0f;
    if (has_weight) {
        float ss = 0.0f;
        for (unsigned int i = lane; i < d; i += 32) {
            float v = bf16_to_f32(xr[i]);
            ss += v * v;
        }
        ss = warp_sum(ss);
        inv_rms = rsqrtf(ss / (float)d + eps);
    }
    const unsigned int* xr2 = reinterpret_cast<const unsigned int*>(xr);
    unsigned int* outr2 = reinterpret_cast<unsigned int*>(outr);
    for (unsigned int p = lane; p < d / 2; p += 32) {
        unsigned int pair = xr2[p];
        float a = __uint_as_float(pair << 16);
        float b = __uint_as_float(pair & 0xffff0000u);
        if (has_weight) {
            a = a * inv_rms * weight[2 * p];
            b = b * inv_rms * weight[2 * p + 1];
        }
        float cp = c[p], sp = s[p];
        float ra = a * cp - b * sp;
        float rb = a * sp + b * cp;
        outr2[p] = (unsigned int)f32_to_bf16(ra) | ((unsigned int)f32_to_bf16(rb) << 16);
    }
}

// out = silu(gate) * up, elementwise over bf16, f32 math, and the running max |out| for the FP8
// quantization that follows (amax_bits zeroed before launch). gate_up holds each row's gate then its
// up values (the fused w1|w3 product, row_pairs pairs of each per row); out is rows x 2*row_pairs.
extern "C" __global__ void zimage_swiglu_amax_bf16(const unsigned int* __restrict__ gate_up,
                                                   unsigned int* __restrict__ out, unsigned long long n_pairs,
                                                   unsigned long long row_pairs, unsigned int* __restrict__ amax_bits) {
    float m = 0.0f;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_pairs; i += stride) {
        unsigned long long row = i / row_pairs, p = i - row * row_pairs;
        const unsigned int* gr = gate_up + row * 2 * row_pairs;
        unsigned int g = gr[p], u = gr[row_pairs + p];
        float g0 = __uint_as_float(g << 16), g1 = __uint_as_float(g & 0xffff0000u);
        float u0 = __uint_as_float(u << 16), u1 = __uint_as_float(u & 0xffff0000u);
        // silu is rounded to bf16 before the product, as torch computes F.silu(x1) * x3 in bf16.
        float s0 = bf16_to_f32(f32_to_bf16(g0 / (1.0f + __expf(-g0))));
        float s1 = bf16_to_f32(f32_to_bf16(g1 / (1.0f + __expf(-g1))));
        bf16_bits o0 = f32_to_bf16(s0 * u0), o1 = f32_to_bf16(s1 * u1);
        m = fmaxf(m, fmaxf(fabsf(bf16_to_f32(o0)), fabsf(bf16_to_f32(o1))));
        out[i] = (unsigned int)o0 | ((unsigned int)o1 << 16);
    }
    block_amax(m, amax_bits);
}

// E4M3 -> f32 (no scale), two elements per thread step. n must be even.
extern "C" __global__ void zimage_e4m3_to_f32(const unsigned short* __restrict__ q, unsigned long long n_pairs,
                                              float2* __restrict__ out) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_pairs; i += stride) {
        unsigned int h2 = 0;
#if __CUDA_ARCH__ >= 890
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(q[i]));
#else
        __trap();
#endif
        unsigned short lo = (unsigned short)(h2 & 0xffffu), hi = (unsigned short)(h2 >> 16);
        float a, b;
        asm("cvt.f32.f16 %0, %1;" : "=f"(a) : "h"(lo));
        asm("cvt.f32.f16 %0, %1;" : "=f"(b) : "h"(hi));
        out[i] = make_float2(a, b);
    }
}

// y[i] += bias[channel of i] in place, NCHW bf16, bias f32 (C).
extern "C" __global__ void zimage_add_channel_bias_bf16(bf16_bits* __restrict__ y, const float* __restrict__ bias,
                                                        unsigned long long n, unsigned long long hw, unsigned int c) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned int ch = (unsigned int)((i / hw) % c);
        y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bias[ch]);
    }
}

// GroupNorm statistics, pass 1. Group (b, g) of NCHW is one contiguous run of `group_len` elements.
// Block (chunk, group) reduces its chunk to (count, mean, M2) with Welford per thread and Chan's
// merge across threads, written to partial[(group * chunks + chunk) * 3 ..].
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
    float total = n + nb;
    if (total == 0.0f) return;
    float delta = meanb - mean;
    float wb = nb / total;
    mean += delta * wb;
    m2 += m2b + delta * delta * n * wb;
    n = total;
}

// Merges every thread's (count, mean, M2) over the block (warp shuffles, then the warps in order);
// the result is valid in thread 0 only.
__device__ __forceinline__ void block_chan_merge(float& n, float& mean, float& m2) {
    for (int o = 16; o > 0; o >>= 1) {
        float nb = __shfl_xor_sync(0xffffffffu, n, o);
        float mb = __shfl_xor_sync(0xffffffffu, mean, o);
        float m2b = __shfl_xor_sync(0xffffffffu, m2, o);
        chan_merge(n, mean, m2, nb, mb, m2b);
    }
    __shared__ float sn[32], sm[32], sm2[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sn[warp] = n; sm[warp] = mean; sm2[warp] = m2; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float tn = 0.0f, tm = 0.0f, tm2 = 0.0f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) chan_merge(tn, tm, tm2, sn[w], sm[w], sm2[w]);
        n = tn; mean = tm; m2 = tm2;
    }
}

extern "C" __global__ void zimage_group_stats_bf16(const bf16_bits* __restrict__ x, unsigned long long group_len,
                                                   unsigned int chunk_len, float* __restrict__ partial) {
    unsigned int chunks = gridDim.x;
    unsigned long long group = blockIdx.y;
    unsigned long long start = (unsigned long long)blockIdx.x * chunk_len;
    unsigned long long end = start + chunk_len;
    if (end > group_len) end = group_len;
    const bf16_bits* xg = x + group * group_len;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float v = bf16_to_f32(xg[i]);
        n += 1.0f;
        float d = v - mean;
        mean += d / n;
        m2 += d * (v - mean);
    }
    block_chan_merge(n, mean, m2);
    if (threadIdx.x == 0) {
        float* p = partial + (group * chunks + blockIdx.x) * 3;
        p[0] = n; p[1] = mean; p[2] = m2;
    }
}

// GroupNorm pass 2: merge the group's partials, then y = (x - mean) * rsqrt(var + eps) * gamma[c]
// + beta[c], optionally followed by SiLU; f32 math, one rounding to bf16.
extern "C" __global__ void zimage_group_norm_apply_bf16(const bf16_bits* __restrict__ x, const float* __restrict__ partial,
                                                        const float* __restrict__ gamma, const float* __restrict__ beta,
                                                        bf16_bits* __restrict__ y, unsigned long long group_len,
                                                        unsigned int chunk_len, unsigned int partial_chunks,
                                                        unsigned long long hw, unsigned int channels_per_group,
                                                        unsigned int groups, float eps, int apply_silu) {
    unsigned long long group = blockIdx.y;
    __shared__ float s_mean, s_inv;
    if (threadIdx.x == 0) {
        float n = 0.0f, mean = 0.0f, m2 = 0.0f;
        const float* p = partial + group * partial_chunks * 3;
        for (unsigned int k = 0; k < partial_chunks; k++) chan_merge(n, mean, m2, p[3 * k], p[3 * k + 1], p[3 * k + 2]);
        s_mean = mean;
        s_inv = rsqrtf(m2 / n + eps);
    }
    __syncthreads();
    float mean = s_mean, inv = s_inv;
    unsigned int g = (unsigned int)(group % groups);
    unsigned long long start = (unsigned long long)blockIdx.x * chunk_len;
    unsigned long long end = start + chunk_len;
    if (end > group_len) end = group_len;
    const bf16_bits* xg = x + group * group_len;
    bf16_bits* yg = y + group * group_len;
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        unsigned int c = g * channels_per_group + (unsigned int)(i / hw);
        float v = (bf16_to_f32(xg[i]) - mean) * inv * gamma[c] + beta[c];
        if (apply_silu) v = v / (1.0f + __expf(-v));
        yg[i] = f32_to_bf16(v);
    }
}

// out = x + bf16(rms_norm(y) * w): the gated residual of a block in one pass. One block per row;
// statistics in f32; the normalized term is rounded to bf16 before the add, as the unfused
// rms_norm-then-add computes it. w: dim f32 (the norm weight with any gate folded in).
extern "C" __global__ void zimage_add_rms_norm_bf16(const bf16_bits* __restrict__ x, const bf16_bits* __restrict__ y,
                                                    const float* __restrict__ w, bf16_bits* __restrict__ out,
                                                    unsigned int dim, float eps) {
    unsigned long long row = blockIdx.x;
    const bf16_bits* xr = x + row * dim;
    const bf16_bits* yr = y + row * dim;
    bf16_bits* outr = out + row * dim;
    float ss = 0.0f;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = bf16_to_f32(yr[i]);
        ss += v * v;
    }
    ss = warp_sum(ss);
    __shared__ float partial[32];
    __shared__ float s_inv;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        ss = warp_sum(ss);
        if (lane == 0) s_inv = rsqrtf(ss / (float)dim + eps);
    }
    __syncthreads();
    float inv = s_inv;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) {
        float n = bf16_to_f32(f32_to_bf16(bf16_to_f32(yr[i]) * inv * w[i]));
        outr[i] = f32_to_bf16(bf16_to_f32(xr[i]) + n);
    }
}

// ---------------------------------------------------------------------------------------------
// Vectorized kernels: 8 bf16 values (one 16-byte load) per thread step and 32-bit index math.
// The memory-bound passes of a step and of the VAE decode; the launchers check that the rows
// are whole multiples of 8 values and that the pointers are 16-byte aligned.

__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        f[2 * j] = __uint_as_float(w[j] << 16);
        f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}

__device__ __forceinline__ unsigned int pack2(float a, float b) {
    return (unsigned int)f32_to_bf16(a) | ((unsigned int)f32_to_bf16(b) << 16);
}

__device__ __forceinline__ uint4 pack8(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
}

// The sum of v over the block, returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// rsqrt(mean(x^2) + eps) of one row of n8 8-value vectors (dim values), returned to every thread.
__device__ __forceinline__ float row_inv_rms(const uint4* __restrict__ xr, unsigned int n8, unsigned int dim, float eps) {
    float f[8];
    float ss = 0.0f;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        unpack8(xr[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) ss += f[j] * f[j];
    }
    return rsqrtf(block_sum(ss) / (float)dim + eps);
}

// Vector i of a normed row: f = bf16(x * inv * w), the values the RMSNorm kernels store.
__device__ __forceinline__ void rms_normed8(const uint4* __restrict__ xr, const uint4* __restrict__ w, unsigned int i,
                                            float inv, float* f) {
    float g[8];
    unpack8(xr[i], f);
    unpack8(w[i], g);
#pragma unroll
    for (int j = 0; j < 8; j++) f[j] = bf16_to_f32(f32_to_bf16(f[j] * inv * g[j]));
}

// out = bf16(x * rsqrt(mean(x^2) + eps) * w) per row of `dim` values (dim % 8 == 0), w bf16 (dim).
// One block per row. When amax_bits is not null it receives max |out| over all rows (zeroed before
// launch), so the FP8 quantization of out needs no separate amax pass.
extern "C" __global__ void zimage_rms_norm_v8_bf16(const uint4* __restrict__ x, const uint4* __restrict__ w,
                                                   uint4* __restrict__ out, unsigned int dim, float eps,
                                                   unsigned int* __restrict__ amax_bits) {
    unsigned int n8 = dim / 8;
    const uint4* xr = x + (unsigned long long)blockIdx.x * n8;
    uint4* outr = out + (unsigned long long)blockIdx.x * n8;
    float f[8];
    float inv = row_inv_rms(xr, n8, dim, eps);
    float m = 0.0f;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        rms_normed8(xr, w, i, inv, f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(f[j]));
        outr[i] = pack8(f);
    }
    if (amax_bits != 0) block_amax(m, amax_bits);
}

// ---------------------------------------------------------------------------------------------
// INT8 (W8A8): per-row symmetric quantization and the scaling of int32 products, with the
// arithmetic of engine/src/int8.rs: scale = max(amax, 1e-12) * (1/127), q = round-half-even(v /
// scale) clamped to [-127, 127], y = bf16((acc * sx[row]) * sw[col]).

// The max of v over the block, returned to every thread.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial_max[32];
    __shared__ float total_max;
    v = warp_max(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial_max[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial_max[lane] : 0.0f;
        v = warp_max(v);
        if (lane == 0) total_max = v;
    }
    __syncthreads();
    return total_max;
}

__device__ __forceinline__ float i8_scale(float amax) {
    return __fmul_rn(fmaxf(amax, 1e-12f), 1.0f / 127.0f);
}

__device__ __forceinline__ unsigned int quantize_i8x4(const float* f, float scale) {
    unsigned int packed = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int q = __float2int_rn(__fdiv_rn(f[j], scale));
        q = max(-127, min(127, q));
        packed |= ((unsigned int)q & 0xffu) << (8 * j);
    }
    return packed;
}

// q (rows x dim int8 bytes), scale[row] from bf16 x (rows x dim, dim % 8 == 0); one block per row.
extern "C" __global__ void zimage_quantize_rows_i8_bf16(const uint4* __restrict__ x, unsigned int dim,
                                                        uint2* __restrict__ q, float* __restrict__ scale) {
    unsigned int n8 = dim / 8;
    const uint4* xr = x + (unsigned long long)blockIdx.x * n8;
    uint2* qr = q + (unsigned long long)blockIdx.x * n8;
    float f[8];
    float m = 0.0f;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        unpack8(xr[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(f[j]));
    }
    float s = i8_scale(block_max(m));
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        unpack8(xr[i], f);
        qr[i] = make_uint2(quantize_i8x4(f, s), quantize_i8x4(f + 4, s));
    }
}

// zimage_rms_norm_v8_bf16's out, and in the same kernel its per-row int8 quantization (q, scale):
// the normed row is computed once more from x and w (the same arithmetic, so the same values)
// instead of being read back.
extern "C" __global__ void zimage_rms_norm_i8_v8_bf16(const uint4* __restrict__ x, const uint4* __restrict__ w,
                                                      uint4* __restrict__ out, unsigned int dim, float eps,
                                                      uint2* __restrict__ q, float* __restrict__ scale) {
    unsigned int n8 = dim / 8;
    const uint4* xr = x + (unsigned long long)blockIdx.x * n8;
    uint4* outr = out + (unsigned long long)blockIdx.x * n8;
    uint2* qr = q + (unsigned long long)blockIdx.x * n8;
    float f[8];
    float inv = row_inv_rms(xr, n8, dim, eps);
    float m = 0.0f;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        rms_normed8(xr, w, i, inv, f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(f[j]));
        outr[i] = pack8(f);
    }
    float s = i8_scale(block_max(m));
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        rms_normed8(xr, w, i, inv, f);
        qr[i] = make_uint2(quantize_i8x4(f, s), quantize_i8x4(f + 4, s));
    }
}

// out[r, c] = bf16((acc[r, c] * sx[r]) * sw[c]) for an (m, n) int32 product, n % 4 == 0.
extern "C" __global__ void zimage_dequant_i32_bf16(const int4* __restrict__ acc, const float* __restrict__ sx,
                                                   const float* __restrict__ sw, uint2* __restrict__ out,
                                                   unsigned int m, unsigned int n) {
    unsigned long long total4 = (unsigned long long)m * n / 4;
    unsigned int n4 = n / 4;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < total4; i += stride) {
        unsigned int r = (unsigned int)(i / n4);
        unsigned int c = (unsigned int)(i % n4) * 4;
        int4 a = acc[i];
        float rs = sx[r];
        float y0 = __fmul_rn(__fmul_rn((float)a.x, rs), sw[c]);
        float y1 = __fmul_rn(__fmul_rn((float)a.y, rs), sw[c + 1]);
        float y2 = __fmul_rn(__fmul_rn((float)a.z, rs), sw[c + 2]);
        float y3 = __fmul_rn(__fmul_rn((float)a.w, rs), sw[c + 3]);
        out[i] = make_uint2(pack2(y0, y1), pack2(y2, y3));
    }
}

// The INT8 feed-forward's middle in one pass per row: the w1|w3 product's int32 sums (rows x
// 2*hidden: gate then up) scaled to bf16 as zimage_dequant_i32_bf16 writes them, silu(gate) * up
// with the rounding of zimage_swiglu_amax_v8_bf16, then the per-row int8 quantization of the
// result for w2 (the bf16 gate|up and the bf16 product never go through global memory).
// hidden % 4 == 0; one block per row; the row's bf16 results wait in shared memory (hidden * 2
// bytes, dynamic) between the row's amax and its quantization.
extern "C" __global__ void zimage_swiglu_i32_i8(const int4* __restrict__ acc, const float* __restrict__ sx,
                                                const float4* __restrict__ sw, unsigned int hidden,
                                                unsigned int* __restrict__ q, float* __restrict__ scale) {
    extern __shared__ bf16_bits h_row[];
    unsigned int n4 = hidden / 4;
    const int4* gr = acc + (unsigned long long)blockIdx.x * 2 * n4;
    float rs = sx[blockIdx.x];
    float m = 0.0f;
    for (unsigned int i = threadIdx.x; i < n4; i += blockDim.x) {
        int4 g = gr[i], u = gr[n4 + i];
        float4 wg = sw[i], wu = sw[n4 + i];
        float gv[4] = {(float)g.x, (float)g.y, (float)g.z, (float)g.w};
        float uv[4] = {(float)u.x, (float)u.y, (float)u.z, (float)u.w};
        float gs[4] = {wg.x, wg.y, wg.z, wg.w};
        float us[4] = {wu.x, wu.y, wu.z, wu.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float gf = bf16_to_f32(f32_to_bf16(__fmul_rn(__fmul_rn(gv[j], rs), gs[j])));
            float uf = bf16_to_f32(f32_to_bf16(__fmul_rn(__fmul_rn(uv[j], rs), us[j])));
            float sl = bf16_to_f32(f32_to_bf16(gf / (1.0f + __expf(-gf))));
            bf16_bits h = f32_to_bf16(sl * uf);
            m = fmaxf(m, fabsf(bf16_to_f32(h)));
            h_row[4 * i + j] = h;
        }
    }
    float s = i8_scale(block_max(m));  // block_max synchronizes: h_row is complete after it
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
    unsigned int* qr = q + (unsigned long long)blockIdx.x * n4;
    for (unsigned int i = threadIdx.x; i < n4; i += blockDim.x) {
        float f[4];
#pragma unroll
        for (int j = 0; j < 4; j++) f[j] = bf16_to_f32(h_row[4 * i + j]);
        qr[i] = quantize_i8x4(f, s);
    }
}

// out = x + bf16(rms_norm(y) * w) (the gated residual), per row of `dim` values (dim % 8 == 0),
// w bf16 (dim); one block per row; the same rounding as zimage_add_rms_norm_bf16.
// When row_scale is not null, y's row r is y[r] * row_scale[r] (an FP8 product left in units of
// its input's row scale, see engine/src/fp8.rs), multiplied in f32 as it is read.
extern "C" __global__ void zimage_add_rms_norm_v8_bf16(const uint4* __restrict__ x, const uint4* __restrict__ y,
                                                       const uint4* __restrict__ w, uint4* __restrict__ out,
                                                       unsigned int dim, float eps, const float* __restrict__ row_scale) {
    unsigned int n8 = dim / 8;
    unsigned long long base = (unsigned long long)blockIdx.x * n8;
    float rs = row_scale != 0 ? row_scale[blockIdx.x] : 1.0f;
    float f[8], g[8], h[8];
    float ss = 0.0f;
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        unpack8(y[base + i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            f[j] *= rs;
            ss += f[j] * f[j];
        }
    }
    float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    for (unsigned int i = threadIdx.x; i < n8; i += blockDim.x) {
        unpack8(y[base + i], f);
        unpack8(w[i], g);
        unpack8(x[base + i], h);
#pragma unroll
        for (int j = 0; j < 8; j++) h[j] = h[j] + bf16_to_f32(f32_to_bf16(f[j] * rs * inv * g[j]));
        out[base + i] = pack8(h);
    }
}

// silu(gate) * up with its running amax, as zimage_swiglu_amax_bf16, 8 values per step: gate_up
// rows hold row_vecs vectors of gate then row_vecs of up; out is rows x row_vecs vectors.
extern "C" __global__ void zimage_swiglu_amax_v8_bf16(const uint4* __restrict__ gate_up, uint4* __restrict__ out,
                                                      unsigned int n_vecs, unsigned int row_vecs,
                                                      unsigned int* __restrict__ amax_bits) {
    float m = 0.0f;
    float g[8], u[8];
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_vecs; i += gridDim.x * blockDim.x) {
        unsigned int row = i / row_vecs, p = i - row * row_vecs;
        const uint4* gr = gate_up + (unsigned long long)row * 2 * row_vecs;
        unpack8(gr[p], g);
        unpack8(gr[row_vecs + p], u);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float s = bf16_to_f32(f32_to_bf16(g[j] / (1.0f + __expf(-g[j]))));
            g[j] = bf16_to_f32(f32_to_bf16(s * u[j]));
            m = fmaxf(m, fabsf(g[j]));
        }
        out[i] = pack8(g);
    }
    block_amax(m, amax_bits);
}

// Per-head RMSNorm + interleaved RoPE for head dim 128 (as zimage_qk_norm_rope_bf16): one warp per
// (token, head) row, 4 values per lane, the row read once; weight bf16 (128) or null.
extern "C" __global__ void zimage_qk_norm_rope_d128_bf16(const bf16_bits* __restrict__ x, const bf16_bits* __restrict__ weight,
                                                        const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                        bf16_bits* __restrict__ out, unsigned int rows,
                                                        unsigned int seq_len, unsigned int heads,
                                                        unsigned long long token_stride, float eps) {
    unsigned int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    unsigned int lane = threadIdx.x & 31;
    if (row >= rows) return;
    unsigned int token = row / heads, head = row - token * heads;
    const uint2* xr = reinterpret_cast<const uint2*>(x + (unsigned long long)token * token_stride + head * 128u);
    uint2 v = xr[lane];
    float a[4] = {__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u),
                  __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u)};
    if (weight != 0) {
        float ss = a[0] * a[0] + a[1] * a[1] + a[2] * a[2] + a[3] * a[3];
        float inv = rsqrtf(warp_sum(ss) / 128.0f + eps);
        uint2 wv = reinterpret_cast<const uint2*>(weight)[lane];
        a[0] *= inv * __uint_as_float(wv.x << 16);
        a[1] *= inv * __uint_as_float(wv.x & 0xffff0000u);
        a[2] *= inv * __uint_as_float(wv.y << 16);
        a[3] *= inv * __uint_as_float(wv.y & 0xffff0000u);
    }
    unsigned int l = token % seq_len;
    float2 c = reinterpret_cast<const float2*>(cos_t + (unsigned long long)l * 64u)[lane];
    float2 s = reinterpret_cast<const float2*>(sin_t + (unsigned long long)l * 64u)[lane];
    uint2 o;
    o.x = pack2(a[0] * c.x - a[1] * s.x, a[0] * s.x + a[1] * c.x);
    o.y = pack2(a[2] * c.y - a[3] * s.y, a[2] * s.y + a[3] * c.y);
    reinterpret_cast<uint2*>(out + (unsigned long long)row * 128u)[lane] = o;
}

// GroupNorm pass 1, 8 values per step: block (chunk, group) reduces chunk_vecs vectors of its
// group (group_vecs vectors, contiguous in NCHW) to (count, mean, M2) partials.
extern "C" __global__ void zimage_group_stats_v8_bf16(const uint4* __restrict__ x, unsigned int group_vecs,
                                                      unsigned int chunk_vecs, float* __restrict__ partial) {
    unsigned int group = blockIdx.y;
    unsigned int start = blockIdx.x * chunk_vecs;
    unsigned int end = min(start + chunk_vecs, group_vecs);
    const uint4* xg = x + (unsigned long long)group * group_vecs;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    float f[8];
    for (unsigned int i = start + threadIdx.x; i < end; i += blockDim.x) {
        unpack8(xg[i], f);
        float s = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) s += f[j];
        float lm = s * 0.125f, lm2 = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) lm2 += (f[j] - lm) * (f[j] - lm);
        chan_merge(n, mean, m2, 8.0f, lm, lm2);
    }
    block_chan_merge(n, mean, m2);
    if (threadIdx.x == 0) {
        float* p = partial + ((unsigned long long)group * gridDim.x + blockIdx.x) * 3;
        p[0] = n; p[1] = mean; p[2] = m2;
    }
}

// GroupNorm pass 2, 8 values per step: the block merges its group's partials in parallel, then
// y = (x - mean) * rsqrt(var + eps) * gamma[c] + beta[c], optionally SiLU. hw_vecs = H*W/8.
extern "C" __global__ void zimage_group_norm_apply_v8_bf16(const uint4* __restrict__ x, const float* __restrict__ partial,
                                                           const float* __restrict__ gamma, const float* __restrict__ beta,
                                                           uint4* __restrict__ y, unsigned int group_vecs,
                                                           unsigned int chunk_vecs, unsigned int partial_chunks,
                                                           unsigned int hw_vecs, unsigned int channels_per_group,
                                                           unsigned int groups, float eps, int apply_silu) {
    unsigned int group = blockIdx.y;
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    const float* p = partial + (unsigned long long)group * partial_chunks * 3;
    for (unsigned int k = threadIdx.x; k < partial_chunks; k += blockDim.x) chan_merge(n, mean, m2, p[3 * k], p[3 * k + 1], p[3 * k + 2]);
    block_chan_merge(n, mean, m2);
    __shared__ float s_mean, s_inv;
    if (threadIdx.x == 0) {
        s_mean = mean;
        s_inv = rsqrtf(m2 / n + eps);
    }
    __syncthreads();
    mean = s_mean;
    float inv = s_inv;
    unsigned int g = group % groups;
    unsigned int start = blockIdx.x * chunk_vecs;
    unsigned int end = min(start + chunk_vecs, group_vecs);
    const uint4* xg = x + (unsigned long long)group * group_vecs;
    uint4* yg = y + (unsigned long long)group * group_vecs;
    float f[8];
    for (unsigned int i = start + threadIdx.x; i < end; i += blockDim.x) {
        unsigned int c = g * channels_per_group + i / hw_vecs;
        float ga = gamma[c], be = beta[c];
        unpack8(xg[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float v = (f[j] - mean) * inv * ga + be;
            if (apply_silu) v = v / (1.0f + __expf(-v));
            f[j] = v;
        }
        yg[i] = pack8(f);
    }
}

// y += bias[channel] in place, NCHW bf16 with H*W % 8 == 0 (hw_vecs = H*W/8), bias f32 (C); then,
// when residual is not null, y = bf16(bf16(y + bias) + residual): the resnet's skip connection in
// the same pass, rounded as a separate bf16 add would round it.
extern "C" __global__ void zimage_add_channel_bias_v8_bf16(uint4* __restrict__ y, const float* __restrict__ bias,
                                                           unsigned int n_vecs, unsigned int hw_vecs, unsigned int c,
                                                           const uint4* __restrict__ residual) {
    float f[8], r[8];
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_vecs; i += gridDim.x * blockDim.x) {
        float b = bias[(i / hw_vecs) % c];
        unpack8(y[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] += b;
        if (residual != 0) {
            unpack8(residual[i], r);
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = bf16_to_f32(f32_to_bf16(f[j])) + r[j];
        }
        y[i] = pack8(f);
    }
}

// Nearest 2x upsampling of NCHW bf16 with W % 4 == 0: each thread reads 4 values of an input row
// and writes them doubled to the two output rows (row r of the N*C*H input rows becomes output
// rows 2r and 2r + 1). w_quads = W / 4, which is also the output row's length in 8-value vectors.
extern "C" __global__ void zimage_upsample_nearest2x_bf16(const uint2* __restrict__ x, uint4* __restrict__ y,
                                                          unsigned int n_quads, unsigned int w_quads) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_quads; i += gridDim.x * blockDim.x) {
        unsigned int row = i / w_quads, q = i - row * w_quads;
        uint2 v = x[i];
        unsigned int a = v.x & 0xffffu, b = v.x >> 16, c = v.y & 0xffffu, d = v.y >> 16;
        uint4 o = make_uint4(a | (a << 16), b | (b << 16), c | (c << 16), d | (d << 16));
        unsigned long long out_row = 2ull * row;
        y[out_row * w_quads + q] = o;
        y[(out_row + 1) * w_quads + q] = o;
    }
}

// ---------------------------------------------------------------------------------------------
// Channels-last (NHWC) VAE passes. cuDNN's tensor-core convolutions compute in NHWC; with the
// decoder's activations kept in that layout no conversion runs around each convolution. C % 8 == 0
// (c_vecs = C / 8 vectors per pixel), 16-byte aligned.

// GroupNorm pass 1, NHWC: block (chunk, batch) reduces chunk_pixels pixels to one (count, mean, M2)
// per group. The 256 threads are 256 / c_vecs rows of c_vecs: thread t reads vector t % c_vecs of
// pixels t / c_vecs, + rows, ...; a vector holds one group's values (channels_per_group % 8 == 0)
// or 8 / channels_per_group whole groups. The block then merges its threads' states group by
// group, in a fixed order. partial[((batch * groups + g) * chunks + chunk) * 3 ..].
extern "C" __global__ void zimage_group_stats_nhwc_v8_bf16(const uint4* __restrict__ x, unsigned int pixels,
                                                           unsigned int c_vecs, unsigned int chunk_pixels,
                                                           unsigned int channels_per_group, unsigned int groups,
                                                           float* __restrict__ partial) {
    __shared__ float st[256 * 8 * 3];
    unsigned int rows = blockDim.x / c_vecs;
    unsigned int v = threadIdx.x % c_vecs, row = threadIdx.x / c_vecs;
    unsigned int per = channels_per_group < 8 ? channels_per_group : 8;  // values of one group in a vector
    unsigned int subs = 8 / per;                                          // groups in a vector
    float n[8], mean[8], m2[8];
#pragma unroll
    for (int k = 0; k < 8; k++) { n[k] = 0.0f; mean[k] = 0.0f; m2[k] = 0.0f; }
    unsigned int start = blockIdx.x * chunk_pixels;
    unsigned int end = min(start + chunk_pixels, pixels);
    const uint4* xb = x + (unsigned long long)blockIdx.y * pixels * c_vecs;
    float f[8];
    if (row < rows) {
        for (unsigned int p = start + row; p < end; p += rows) {
            unpack8(xb[(unsigned long long)p * c_vecs + v], f);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if ((unsigned int)k < subs) {
                    float s = 0.0f;
                    for (unsigned int j = 0; j < per; j++) s += f[k * per + j];
                    float lm = s / (float)per, lm2 = 0.0f;
                    for (unsigned int j = 0; j < per; j++) lm2 += (f[k * per + j] - lm) * (f[k * per + j] - lm);
                    chan_merge(n[k], mean[k], m2[k], (float)per, lm, lm2);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < 8; k++) {
        st[(threadIdx.x * 8 + k) * 3] = n[k];
        st[(threadIdx.x * 8 + k) * 3 + 1] = mean[k];
        st[(threadIdx.x * 8 + k) * 3 + 2] = m2[k];
    }
    __syncthreads();
    for (unsigned int g = threadIdx.x; g < groups; g += blockDim.x) {
        float tn = 0.0f, tm = 0.0f, tm2 = 0.0f;
        unsigned int c0 = g * channels_per_group;
        unsigned int v0 = c0 / 8, v1 = (c0 + channels_per_group + 7) / 8;
        unsigned int sub = (c0 % 8) / per;
        for (unsigned int r = 0; r < rows; r++) {
            for (unsigned int vv = v0; vv < v1; vv++) {
                const float* e = st + ((r * c_vecs + vv) * 8 + sub) * 3;
                chan_merge(tn, tm, tm2, e[0], e[1], e[2]);
            }
        }
        float* out = partial + (((unsigned long long)blockIdx.y * groups + g) * gridDim.x + blockIdx.x) * 3;
        out[0] = tn; out[1] = tm; out[2] = tm2;
    }
}

// GroupNorm pass 2, NHWC: block (batch * groups + g) merges its group's chunk partials into
// stats[2 * (batch * groups + g)] = (mean, rsqrt(var + eps)).
extern "C" __global__ void zimage_group_finalize(const float* __restrict__ partial, unsigned int chunks, float eps,
                                                 float* __restrict__ stats) {
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;
    const float* p = partial + (unsigned long long)blockIdx.x * chunks * 3;
    for (unsigned int k = threadIdx.x; k < chunks; k += blockDim.x) chan_merge(n, mean, m2, p[3 * k], p[3 * k + 1], p[3 * k + 2]);
    block_chan_merge(n, mean, m2);
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rsqrtf(m2 / n + eps);
    }
}

// GroupNorm pass 3, NHWC: y = (x - mean) * inv * gamma[c] + beta[c], optionally SiLU.
extern "C" __global__ void zimage_group_norm_apply_nhwc_v8_bf16(const uint4* __restrict__ x, const float* __restrict__ stats,
                                                                const float* __restrict__ gamma, const float* __restrict__ beta,
                                                                uint4* __restrict__ y, unsigned int n_vecs, unsigned int c_vecs,
                                                                unsigned int pixels, unsigned int channels_per_group,
                                                                unsigned int groups, int apply_silu) {
    float f[8];
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_vecs; i += gridDim.x * blockDim.x) {
        unsigned int pix = i / c_vecs, c0 = (i - pix * c_vecs) * 8;
        unsigned int batch = pix / pixels;
        const float* sb = stats + 2ull * batch * groups;
        unpack8(x[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            unsigned int c = c0 + j, g = c / channels_per_group;
            float v = (f[j] - sb[2 * g]) * sb[2 * g + 1] * gamma[c] + beta[c];
            if (apply_silu) v = v / (1.0f + __expf(-v));
            f[j] = v;
        }
        y[i] = pack8(f);
    }
}

// y += bias[channel] in place, NHWC bf16 with C % 8 == 0, then the residual (when not null) added
// with the same rounding as zimage_add_channel_bias_v8_bf16.
extern "C" __global__ void zimage_add_channel_bias_nhwc_v8_bf16(uint4* __restrict__ y, const float* __restrict__ bias,
                                                                unsigned int n_vecs, unsigned int c_vecs,
                                                                const uint4* __restrict__ residual) {
    float f[8], r[8];
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_vecs; i += gridDim.x * blockDim.x) {
        const float* b = bias + (i % c_vecs) * 8;
        unpack8(y[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] += b[j];
        if (residual != 0) {
            unpack8(residual[i], r);
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = bf16_to_f32(f32_to_bf16(f[j])) + r[j];
        }
        y[i] = pack8(f);
    }
}

// The same for any C (the decoder's 3-channel output convolution), one value per step.
extern "C" __global__ void zimage_add_channel_bias_nhwc_bf16(bf16_bits* __restrict__ y, const float* __restrict__ bias,
                                                             unsigned long long n, unsigned int c,
                                                             const bf16_bits* __restrict__ residual) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = bf16_to_f32(y[i]) + bias[i % c];
        if (residual != 0) v = bf16_to_f32(f32_to_bf16(v)) + bf16_to_f32(residual[i]);
        y[i] = f32_to_bf16(v);
    }
}

// Nearest 2x upsampling, NHWC bf16 with C % 8 == 0: output vector i (pixel (b, oy, ox), channels
// 8 * (i % c_vecs) ..) copies input pixel (b, oy / 2, ox / 2).
extern "C" __global__ void zimage_upsample_nearest2x_nhwc_bf16(const uint4* __restrict__ x, uint4* __restrict__ y,
                                                               unsigned int n_out_vecs, unsigned int c_vecs,
                                                               unsigned int h, unsigned int w) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_out_vecs; i += gridDim.x * blockDim.x) {
        unsigned int v = i % c_vecs, p = i / c_vecs;
        unsigned int ox = p % (2 * w), rest = p / (2 * w);
        unsigned int oy = rest % (2 * h), b = rest / (2 * h);
        y[i] = x[(((unsigned long long)b * h + oy / 2) * w + ox / 2) * c_vecs + v];
    }
}

// ---------------------------------------------------------------------------------------------
// FP8 E4M3 with one scale per row (token): each kernel takes its row's amax and casts in the same
// launch, so no separate amax or quantize pass over the activation is needed. scale = max(amax,
// 1e-12) / 448, q = v / scale rounded to nearest and saturated (as the per-tensor kernels), the
// values v rounded to bf16 first, as the unfused ops would store them. One block per row.

// 8 floats times inv as 8 E4M3 bytes.
__device__ __forceinline__ uint2 e4m3x8(const float* f, float inv) {
    unsigned int lo = (unsigned int)pack_e4m3x2(f[0] * inv, f[1] * inv) | ((unsigned int)pack_e4m3x2(f[2] * inv, f[3] * inv) << 16);
    unsigned int hi = (unsigned int)pack_e4m3x2(f[4] * inv, f[5] * inv) | ((unsigned int)pack_e4m3x2(f[6] * inv, f[7] * inv) << 16);
    return make_uint2(lo, hi);
}

// The row's scale from its amax; thread 0 stores it. Returns 1 / scale.
__device__ __forceinline__ float e4m3_row_scale(float amax, float* __restrict__ scale_out) {
    float scale = fmaxf(amax, 1e-12f) / 448.0f;
    if (threadIdx.x == 0) scale_out[blockIdx.x] = scale;
    return 1.0f / scale;
}

// Vectors a thread of the one-block-per-row E4M3 kernels keeps in registers: a row of up to
// ROW_KEEP * blockDim.x vectors is read from memory once, its loads all issued before any math
// (the launcher gives rows of up to 1,024 vectors 256 threads or fewer, so every Z-Image row fits;
// a longer row re-reads the rest). Loops over the kept vectors are unrolled with constant
// indices, so the arrays stay in registers (a runtime index put them on the stack).
#define ROW_KEEP 6

// A thread's kept bf16 vectors (its first ROW_KEEP of a row of `vecs`) written as E4M3 times qinv.
__device__ __forceinline__ void store_kept_e4m3(const uint4 (&keep)[ROW_KEEP], unsigned int vecs, float qinv, uint2* __restrict__ qr) {
    float f[8];
#pragma unroll
    for (int n = 0; n < ROW_KEEP; n++) {
        unsigned int i = threadIdx.x + n * blockDim.x;
        if (i < vecs) {
            unpack8(keep[n], f);
            qr[i] = e4m3x8(f, qinv);
        }
    }
}

// q = E4M3(bf16(x * rsqrt(mean(x^2) + eps) * w)) per row of dim values (dim % 8 == 0), never
// written in bf16. The sum of squares is taken in the order row_inv_rms takes it (each thread's
// vectors in ascending order), so the result is the same bit for bit.
extern "C" __global__ void zimage_rms_norm_e4m3_rows_v8_bf16(const uint4* __restrict__ x, const uint4* __restrict__ w,
                                                             uint2* __restrict__ q, float* __restrict__ scale_out,
                                                             unsigned int dim, float eps) {
    unsigned int n8 = dim / 8;
    const uint4* xr = x + (unsigned long long)blockIdx.x * n8;
    uint2* qr = q + (unsigned long long)blockIdx.x * n8;
    uint4 keep[ROW_KEEP];
    float f[8], g[8];
#pragma unroll
    for (int n = 0; n < ROW_KEEP; n++) {
        unsigned int i = threadIdx.x + n * blockDim.x;
        if (i < n8) keep[n] = xr[i];
    }
    float ss = 0.0f;
#pragma unroll
    for (int n = 0; n < ROW_KEEP; n++) {
        unsigned int i = threadIdx.x + n * blockDim.x;
        if (i < n8) {
            unpack8(keep[n], f);
#pragma unroll
            for (int j = 0; j < 8; j++) ss += f[j] * f[j];
        }
    }
    for (unsigned int i = threadIdx.x + ROW_KEEP * blockDim.x; i < n8; i += blockDim.x) {
        unpack8(xr[i], f);
#pragma unroll
        for (int j = 0; j < 8; j++) ss += f[j] * f[j];
    }
    float inv = rsqrtf(block_sum(ss) / (float)dim + eps);
    float m = 0.0f;
#pragma unroll
    for (int n = 0; n < ROW_KEEP; n++) {
        unsigned int i = threadIdx.x + n * blockDim.x;
        if (i < n8) {
            unpack8(keep[n], f);
            unpack8(w[i], g);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                f[j] = bf16_to_f32(f32_to_bf16(f[j] * inv * g[j]));
                m = fmaxf(m, fabsf(f[j]));
            }
            keep[n] = pack8(f);  // the normed values are bf16 already: kept exactly
        }
    }
    for (unsigned int i = threadIdx.x + ROW_KEEP * blockDim.x; i < n8; i += blockDim.x) {
        rms_normed8(xr, w, i, inv, f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(f[j]));
    }
    float qinv = e4m3_row_scale(block_max(m), scale_out);
    store_kept_e4m3(keep, n8, qinv, qr);
    for (unsigned int i = threadIdx.x + ROW_KEEP * blockDim.x; i < n8; i += blockDim.x) {
        rms_normed8(xr, w, i, inv, f);
        qr[i] = e4m3x8(f, qinv);
    }
}

// silu(gate) * up (silu rounded to bf16 first, the product rounded to bf16, as
// zimage_swiglu_amax_v8_bf16) cast to E4M3 with its row's scale: gate_up rows hold row_vecs
// vectors of gate then row_vecs of up; q is rows x row_vecs vectors of 8 bytes.
__device__ __forceinline__ void swiglu8_values(uint4 gv, uint4 uv, float rs, float* h) {
    float u[8];
    unpack8(gv, h);
    unpack8(uv, u);
#pragma unroll
    for (int j = 0; j < 8; j++) {
        h[j] *= rs;
        u[j] *= rs;
        float s = bf16_to_f32(f32_to_bf16(h[j] / (1.0f + __expf(-h[j]))));
        h[j] = bf16_to_f32(f32_to_bf16(s * u[j]));
    }
}

__device__ __forceinline__ void swiglu8(const uint4* gr, unsigned int row_vecs, unsigned int p, float rs, float* h) {
    swiglu8_values(gr[p], gr[row_vecs + p], rs, h);
}

// When row_scale is not null, gate_up's row r is in units of row_scale[r] (multiplied in first).
// A thread's first ROW_KEEP gate and up vectors are loaded together, and their products kept (as
// the bf16 values they are) for the cast; a longer row recomputes the rest.
extern "C" __global__ void zimage_swiglu_e4m3_rows_v8_bf16(const uint4* __restrict__ gate_up, uint2* __restrict__ q,
                                                           float* __restrict__ scale_out, unsigned int row_vecs,
                                                           const float* __restrict__ row_scale) {
    float rs = row_scale != 0 ? row_scale[blockIdx.x] : 1.0f;
    const uint4* gr = gate_up + (unsigned long long)blockIdx.x * 2 * row_vecs;
    uint2* qr = q + (unsigned long long)blockIdx.x * row_vecs;
    uint4 gate[ROW_KEEP], up[ROW_KEEP];
    float h[8];
#pragma unroll
    for (int n = 0; n < ROW_KEEP; n++) {
        unsigned int p = threadIdx.x + n * blockDim.x;
        if (p < row_vecs) {
            gate[n] = gr[p];
            up[n] = gr[row_vecs + p];
        }
    }
    float m = 0.0f;
#pragma unroll
    for (int n = 0; n < ROW_KEEP; n++) {
        unsigned int p = threadIdx.x + n * blockDim.x;
        if (p < row_vecs) {
            swiglu8_values(gate[n], up[n], rs, h);
#pragma unroll
            for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(h[j]));
            gate[n] = pack8(h);
        }
    }
    for (unsigned int p = threadIdx.x + ROW_KEEP * blockDim.x; p < row_vecs; p += blockDim.x) {
        swiglu8(gr, row_vecs, p, rs, h);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(h[j]));
    }
    float qinv = e4m3_row_scale(block_max(m), scale_out);
    store_kept_e4m3(gate, row_vecs, qinv, qr);
    for (unsigned int p = threadIdx.x + ROW_KEEP * blockDim.x; p < row_vecs; p += blockDim.x) {
        swiglu8(gr, row_vecs, p, rs, h);
        qr[p] = e4m3x8(h, qinv);
    }
}

// A bf16 (rows, dim) activation (dim % 8 == 0) cast to E4M3 with one scale per row.
extern "C" __global__ void zimage_quantize_e4m3_rows_v8_bf16(const uint4* __restrict__ x, uint2* __restrict__ q,
                                                             float* __restrict__ scale_out, unsigned int row_vecs) {
    const uint4* xr = x + (unsigned long long)blockIdx.x * row_vecs;
    uint2* qr = q + (unsigned long long)blockIdx.x * row_vecs;
    float f[8];
    float m = 0.0f;
    for (unsigned int p = threadIdx.x; p < row_vecs; p += blockDim.x) {
        unpack8(xr[p], f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(f[j]));
    }
    float qinv = e4m3_row_scale(block_max(m), scale_out);
    for (unsigned int p = threadIdx.x; p < row_vecs; p += blockDim.x) {
        unpack8(xr[p], f);
        qr[p] = e4m3x8(f, qinv);
    }
}

// softmax(x * scale) over rows of cols bf16 values (cols % 8 == 0), in f32, written in bf16: the
// VAE's mid-block attention probabilities from its bf16 scores in one pass of the row (max, sum,
// write; the row re-read through the cache), instead of f32 copies of the whole score block.
extern "C" __global__ void zimage_softmax_scaled_rows_bf16(const uint4* __restrict__ x, uint4* __restrict__ out,
                                                           unsigned int row_vecs, float scale) {
    const uint4* xr = x + (unsigned long long)blockIdx.x * row_vecs;
    uint4* outr = out + (unsigned long long)blockIdx.x * row_vecs;
    float f[8];
    const float neg_inf = __int_as_float(0xff800000);
    float m = neg_inf;
    for (unsigned int p = threadIdx.x; p < row_vecs; p += blockDim.x) {
        unpack8(xr[p], f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, f[j] * scale);
    }
    // The row's maximum (block_max assumes non-negative values: scores may all be negative).
    __shared__ float warp_m[32];
    __shared__ float row_m;
    m = warp_max(m);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_m[warp] = m;
    __syncthreads();
    if (warp == 0) {
        float v = lane < (int)(blockDim.x >> 5) ? warp_m[lane] : neg_inf;
        v = warp_max(v);
        if (lane == 0) row_m = v;
    }
    __syncthreads();
    m = row_m;
    float s = 0.0f;
    for (unsigned int p = threadIdx.x; p < row_vecs; p += blockDim.x) {
        unpack8(xr[p], f);
#pragma unroll
        for (int j = 0; j < 8; j++) s += expf(f[j] * scale - m);
    }
    float inv = 1.0f / block_sum(s);
    for (unsigned int p = threadIdx.x; p < row_vecs; p += blockDim.x) {
        unpack8(xr[p], f);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] = expf(f[j] * scale - m) * inv;
        outr[p] = pack8(f);
    }
}

// The q and k heads of a fused (tokens, H + 2 KV, 128) qkv product for FlashAttention-3's FP8
// forward: per-head RMSNorm + interleaved RoPE as above, written as E4M3 ((tokens, H, 128) and
// (tokens, KV, 128)) with one static scale per tensor. After the norm every value is bounded:
// |x_i| * rsqrt(mean x^2) <= sqrt(128), times max|w|, and the rotation keeps each pair's length;
// so 448 / (sqrt(128) * max|w|) maps the largest possible value onto E4M3's largest and no value
// ever saturates, with no amax pass. Each warp derives that scale from the weight it loads anyway;
// descale_q/descale_k (the inverse, what the attention kernel multiplies back) are written by the
// first q row and the first k row. One warp per QK_ROWS consecutive (token, head) rows, q heads
// then k heads, their loads issued before any math (more bytes in flight than one row a warp).
// The warp of k head j also reads v head j of its token and takes its max |v| (one atomic per
// block into v_amax_bits, zeroed before the launch), so v's per-tensor quantization needs one
// pass after.
#define QK_ROWS 4
extern "C" __global__ void zimage_qk_norm_rope_e4m3_d128(const bf16_bits* __restrict__ x,
                                                         const bf16_bits* __restrict__ weight_q,
                                                         const bf16_bits* __restrict__ weight_k,
                                                         const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                         unsigned int* __restrict__ q_out, unsigned int* __restrict__ k_out,
                                                         float* __restrict__ descale_q, float* __restrict__ descale_k,
                                                         unsigned int* __restrict__ v_amax_bits,
                                                         unsigned int tokens, unsigned int seq_len,
                                                         unsigned int heads_q, unsigned int heads_k,
                                                         unsigned long long token_stride, float eps) {
    unsigned int heads = heads_q + heads_k;
    unsigned int first = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * QK_ROWS;
    unsigned int lane = threadIdx.x & 31;
    unsigned int total = tokens * heads;
    uint2 xv[QK_ROWS], vv[QK_ROWS];
    float2 cv[QK_ROWS], sv[QK_ROWS];
#pragma unroll
    for (int r = 0; r < QK_ROWS; r++) {
        unsigned int row = first + r;
        if (row < total) {
            unsigned int token = row / heads, head = row - token * heads;
            const bf16_bits* xt = x + (unsigned long long)token * token_stride;
            xv[r] = reinterpret_cast<const uint2*>(xt + head * 128u)[lane];
            // v head (head - heads_q) sits heads_k heads after k head (head - heads_q)
            if (head >= heads_q) vv[r] = reinterpret_cast<const uint2*>(xt + (head + heads_k) * 128u)[lane];
            unsigned int l = token % seq_len;
            cv[r] = reinterpret_cast<const float2*>(cos_t + (unsigned long long)l * 64u)[lane];
            sv[r] = reinterpret_cast<const float2*>(sin_t + (unsigned long long)l * 64u)[lane];
        }
    }
    float v_max = 0.0f;
#pragma unroll
    for (int r = 0; r < QK_ROWS; r++) {
        unsigned int row = first + r;
        // whole warps are in or out of each row (the warp shares it), so the shuffles below see
        // all 32 lanes
        if (row < total) {
            unsigned int token = row / heads, head = row - token * heads;
            bool is_k = head >= heads_q;
            const bf16_bits* weight = is_k ? weight_k : weight_q;
            uint2 v = xv[r];
            float a[4] = {__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u),
                          __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u)};
            float ss = a[0] * a[0] + a[1] * a[1] + a[2] * a[2] + a[3] * a[3];
            float inv = rsqrtf(warp_sum(ss) / 128.0f + eps);
            uint2 wv = reinterpret_cast<const uint2*>(weight)[lane];
            float w[4] = {__uint_as_float(wv.x << 16), __uint_as_float(wv.x & 0xffff0000u),
                          __uint_as_float(wv.y << 16), __uint_as_float(wv.y & 0xffff0000u)};
            float wmax = warp_max(fmaxf(fmaxf(fabsf(w[0]), fabsf(w[1])), fmaxf(fabsf(w[2]), fabsf(w[3]))));
            float bound = fmaxf(11.3137085f * wmax, 1e-30f);  // sqrt(128) * max|w|
            float scale = 448.0f / bound;
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] *= inv * w[i];
            float2 c = cv[r], sn = sv[r];
            unsigned int lo = pack_e4m3x2((a[0] * c.x - a[1] * sn.x) * scale, (a[0] * sn.x + a[1] * c.x) * scale);
            unsigned int hi = pack_e4m3x2((a[2] * c.y - a[3] * sn.y) * scale, (a[2] * sn.y + a[3] * c.y) * scale);
            unsigned int packed = lo | (hi << 16);
            if (is_k) {
                k_out[((unsigned long long)token * heads_k + (head - heads_q)) * 32u + lane] = packed;
                if (row == heads_q && lane == 0) descale_k[0] = bound / 448.0f;
                uint2 vr = vv[r];
                v_max = fmaxf(v_max, fmaxf(fmaxf(fabsf(__uint_as_float(vr.x << 16)), fabsf(__uint_as_float(vr.x & 0xffff0000u))),
                                           fmaxf(fabsf(__uint_as_float(vr.y << 16)), fabsf(__uint_as_float(vr.y & 0xffff0000u)))));
            } else {
                q_out[((unsigned long long)token * heads_q + head) * 32u + lane] = packed;
                if (row == 0 && lane == 0) descale_q[0] = bound / 448.0f;
            }
        }
    }
    block_amax(v_max, v_amax_bits);
}

// max |x| over `rows` rows of row_vecs 8-value vectors, rows row_stride values apart (a head-range
// view of a fused product), into amax_bits (zeroed before the launch).
extern "C" __global__ void zimage_amax_rows_strided_bf16(const bf16_bits* __restrict__ x, unsigned int rows,
                                                         unsigned int row_vecs, unsigned long long row_stride,
                                                         unsigned int* __restrict__ amax_bits) {
    float m = 0.0f;
    unsigned long long n = (unsigned long long)rows * row_vecs;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned long long r = i / row_vecs, c = i - r * row_vecs;
        uint4 v = reinterpret_cast<const uint4*>(x + r * row_stride)[c];
        float f[8];
        unpack8(v, f);
#pragma unroll
        for (int j = 0; j < 8; j++) m = fmaxf(m, fabsf(f[j]));
    }
    block_amax(m, amax_bits);
}

// The rows above quantized to contiguous E4M3 with one per-tensor scale from amax_bits (largest
// value -> 448); descale_out = amax / 448, the factor that dequantizes.
extern "C" __global__ void zimage_quantize_e4m3_rows_strided_bf16(const bf16_bits* __restrict__ x, unsigned int rows,
                                                                  unsigned int row_vecs, unsigned long long row_stride,
                                                                  const unsigned int* __restrict__ amax_bits,
                                                                  uint2* __restrict__ q, float* __restrict__ descale_out) {
    float descale = fmaxf(__uint_as_float(amax_bits[0]), 1e-12f) / 448.0f;
    float inv = 1.0f / descale;
    if (blockIdx.x == 0 && threadIdx.x == 0) descale_out[0] = descale;
    unsigned long long n = (unsigned long long)rows * row_vecs;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        unsigned long long r = i / row_vecs, c = i - r * row_vecs;
        float f[8];
        unpack8(reinterpret_cast<const uint4*>(x + r * row_stride)[c], f);
        q[i] = e4m3x8(f, inv);
    }
}
