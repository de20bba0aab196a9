// Fused CUDA kernels of the engine, compiled to PTX by engine/build.rs when the `cuda` feature is on.
// No CUDA headers are included: bf16 is handled as its raw 16 bits, FP8 conversion uses the PTX
// `cvt ... e4m3x2` instruction (sm_89 and newer), so the file builds with any nvcc and no cccl.

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

// amax_bits[0] = max(amax_bits[0], bits of max |x|). Non-negative floats order like their bits, so
// an integer atomicMax is a float max. amax_bits must be zeroed before the first launch.
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

__device__ __forceinline__ unsigned short pack_e4m3x2(float lo, float hi) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
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
// x, out: rows x d bf16 (row = (b * L + l) * H + h); weight: d f32 (ignored when has_weight == 0);
// cos, sin: L x d/2 f32.
extern "C" __global__ void zimage_qk_norm_rope_bf16(const bf16_bits* __restrict__ x, const float* __restrict__ weight,
                                                   const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                                   bf16_bits* __restrict__ out, unsigned int rows,
                                                   unsigned int seq_len, unsigned int heads, unsigned int d,
                                                   int has_weight, float eps) {
    unsigned int warps_per_block = blockDim.x >> 5;
    unsigned int row = blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    unsigned int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16_bits* xr = x + (unsigned long long)row * d;
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
// quantization that follows (amax_bits zeroed before launch). n a multiple of 2.
extern "C" __global__ void zimage_swiglu_amax_bf16(const unsigned int* __restrict__ gate, const unsigned int* __restrict__ up,
                                                   unsigned int* __restrict__ out, unsigned long long n_pairs,
                                                   unsigned int* __restrict__ amax_bits) {
    float m = 0.0f;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_pairs; i += stride) {
        unsigned int g = gate[i], u = up[i];
        float g0 = __uint_as_float(g << 16), g1 = __uint_as_float(g & 0xffff0000u);
        float u0 = __uint_as_float(u << 16), u1 = __uint_as_float(u & 0xffff0000u);
        // silu is rounded to bf16 before the product, as torch computes F.silu(x1) * x3 in bf16.
        float s0 = bf16_to_f32(f32_to_bf16(g0 / (1.0f + __expf(-g0))));
        float s1 = bf16_to_f32(f32_to_bf16(g1 / (1.0f + __expf(-g1))));
        bf16_bits o0 = f32_to_bf16(s0 * u0), o1 = f32_to_bf16(s1 * u1);
        m = fmaxf(m, fmaxf(fabsf(bf16_to_f32(o0)), fabsf(bf16_to_f32(o1))));
        out[i] = (unsigned int)o0 | ((unsigned int)o1 << 16);
    }
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
