/*
 * RM2S middle step on the GPU: confidence map, 2-means threshold and the 9-channel stage-2
 * input, with no host round trip between the passes. The specification is the NumPy
 * reference dereflect.middle_step.reference; tests compare every pass with it.
 *
 * Plain CUDA C with extern "C" entry points and no includes, so NVRTC (cupy RawModule),
 * pycuda SourceModule(no_extern_c=True) and nvcc -cubin/-ptx all load it by name (pass
 * dereflect.middle_step.cuda.kernel_defines() as options to pin the sizes below). Nothing
 * newer than CUDA 11.4 / sm_72 is used (double atomicAdd needs sm_60).
 *
 * Tensors are NCHW and contiguous: I (image) N x 3 x H x W float32 RGB in [0, 1]; B1
 * (stage-1 output) the same, float32 or float16 (passed as raw 16-bit words). The batch
 * index is blockIdx.z in passes (a), (b), (d) and blockIdx.x in pass (c).
 *
 * Per-image workspace (n = image index), which must be zero before the first frame:
 *   int          max_bits[n]                   bits of the largest C (C >= 0, so integer
 *                                              order is float order and atomicMax works)
 *   unsigned int hist_count[n * BINS + b]      non-zero C values in bin b
 *   double       hist_sum[n * BINS + b]        their sum (centres are exact, not bin centres)
 *   float        result[n * RESULT_SIZE + i]   i = 0 low centre, 1 high centre,
 *                                              2 background upper threshold low + c2 (high - low),
 *                                              3 reflection lower threshold high - c1 (high - low),
 *                                              4 max C, 5 count of non-zero C, 6 split bin
 *                                              (-1: none), 7 bin width max / BINS
 * Pass (c) zeroes max_bits and the histogram after reading them, so the workspace is ready
 * for the next frame without a memset.
 *
 * Passes, in stream order (geometry: dereflect.middle_step.cuda.launch_config):
 * (a) rm2s_confidence_f32 / rm2s_confidence_b1f16, grid (ceil(W/TILE_W), ceil(H/TILE_H), N),
 *     block (TILE_W, TILE_H): grey of I and B1 into a shared tile with a 2-pixel halo
 *     (BORDER_REFLECT_101), separable 5x5 Sobel (rows then columns, as OpenCV) of gray(I),
 *     gray(B1) and gray(I) - gray(B1), M = G_I > gradient_threshold,
 *     C = log(G_R / (G_B + eps) + 1) * M in float32 (eps = 1e-7 underflows in float16),
 *     optional M as uint8, block max of C folded into max_bits with atomicMax. Roundings are
 *     spelled out (__fadd_rn etc., no FMA contraction) in the reference's order, so C matches
 *     it to log1pf's last bit even where G_B is near eps and C is ill-conditioned.
 * (b) rm2s_histogram, grid (G, 1, N), block HIST_THREADS: C > 0 goes to bin
 *     min(floor(C * (BINS / max)), BINS - 1); shared-memory block histograms (count, float
 *     sum) are added to the global ones with atomicAdd.
 * (c) rm2s_two_means, grid (N), block SCAN_THREADS: scan of counts and sums, then the split
 *     between bins maximising S_L^2 / n_L + S_R^2 / n_R (minimum within-cluster sum of
 *     squares; ties to the lowest split); writes result. No split (fewer than two non-empty
 *     bins): both centres are the mean of the non-zero C (0 when there is none), so with no
 *     edges or a single distinct value both masks come out empty.
 * (d) rm2s_stage2_input_f32 / rm2s_stage2_input_f16, grid (ceil(H*W/STAGE2_THREADS), 1, N),
 *     block STAGE2_THREADS: reads the thresholds from result and writes N x 9 x H x W
 *     [I, I * mask_background, I * mask_reflection], mask_background = 0 < C < result[2],
 *     mask_reflection = C > result[3]; optional uint8 masks.
 */

#ifndef RM2S_TILE_W
#define RM2S_TILE_W 32
#endif
#ifndef RM2S_TILE_H
#define RM2S_TILE_H 8
#endif
#ifndef RM2S_BINS
#define RM2S_BINS 4096
#endif
#ifndef RM2S_HIST_THREADS
#define RM2S_HIST_THREADS 256
#endif
#ifndef RM2S_SCAN_THREADS
#define RM2S_SCAN_THREADS 1024
#endif
#ifndef RM2S_STAGE2_THREADS
#define RM2S_STAGE2_THREADS 256
#endif
#ifndef RM2S_RESULT_SIZE
#define RM2S_RESULT_SIZE 8
#endif

#define RM2S_HALO 2
#define RM2S_SHARED_H (RM2S_TILE_H + 2 * RM2S_HALO)
#define RM2S_SHARED_W (RM2S_TILE_W + 2 * RM2S_HALO)
#define RM2S_TILE_THREADS (RM2S_TILE_W * RM2S_TILE_H)
#define RM2S_BINS_PER_THREAD (RM2S_BINS / RM2S_SCAN_THREADS)

#if RM2S_BINS % RM2S_SCAN_THREADS != 0
#error "RM2S_BINS must be a multiple of RM2S_SCAN_THREADS"
#endif
#if (RM2S_TILE_THREADS & (RM2S_TILE_THREADS - 1)) != 0 || (RM2S_SCAN_THREADS & (RM2S_SCAN_THREADS - 1)) != 0
#error "RM2S_TILE_W * RM2S_TILE_H and RM2S_SCAN_THREADS must be powers of two (tree reductions)"
#endif

#ifndef RM2S_HOST_EMULATION
/* float16 <-> float32 by PTX cvt (round to nearest even), so no cuda_fp16.h include is needed
   under NVRTC. The tests' host emulation of this file supplies its own versions. */
__device__ __forceinline__ unsigned short rm2s_float_to_half(float f)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float rm2s_half_to_float(unsigned short h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

__device__ __forceinline__ float rm2s_load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float rm2s_load(const unsigned short* p, size_t i) { return rm2s_half_to_float(p[i]); }
__device__ __forceinline__ void rm2s_store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void rm2s_store(unsigned short* p, size_t i, float v) { p[i] = rm2s_float_to_half(v); }

/* OpenCV BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), also for sides shorter than the halo. */
__device__ __forceinline__ int rm2s_reflect101(int p, int len)
{
    if (len == 1) return 0;
    while (p < 0 || p >= len) p = p < 0 ? -p : 2 * len - 2 - p;
    return p;
}

/* The arithmetic below spells out every rounding (no FMA contraction), in the order of the
   NumPy reference, so C matches it to the last bit apart from log1pf. */
__device__ __forceinline__ float rm2s_gray(float r, float g, float b)
{
    return __fadd_rn(__fadd_rn(__fmul_rn(0.2125f, r), __fmul_rn(0.7154f, g)), __fmul_rn(0.0721f, b));
}

/* OpenCV ksize=5 taps as correlation: smoothing [1 4 6 4 1] summed symmetrically, derivative
   [-1 -2 0 2 1] as differences, so a flat region gives exactly 0 (G_B is divided by G_B + eps). */
__device__ __forceinline__ float rm2s_smooth5(float v0, float v1, float v2, float v3, float v4)
{
    return __fadd_rn(__fadd_rn(__fmul_rn(6.0f, v2), __fmul_rn(4.0f, __fadd_rn(v1, v3))), __fadd_rn(v0, v4));
}

__device__ __forceinline__ float rm2s_deriv5(float v0, float v1, float v3, float v4)
{
    return __fadd_rn(__fmul_rn(2.0f, __fsub_rn(v3, v1)), __fsub_rn(v4, v0));
}

template <typename TB>
__device__ void rm2s_confidence_impl(const float* __restrict__ image, const TB* __restrict__ stage1, int height,
                                     int width, float gradient_threshold, float eps,
                                     float* __restrict__ confidence, unsigned char* __restrict__ gradient_mask,
                                     int* __restrict__ max_bits)
{
    __shared__ float s_gray_i[RM2S_SHARED_H][RM2S_SHARED_W];
    __shared__ float s_gray_b[RM2S_SHARED_H][RM2S_SHARED_W];
    /* Row-filtered tile: [signal I, B, R][smooth, derivative]. */
    __shared__ float s_rows[6][RM2S_SHARED_H][RM2S_TILE_W];
    __shared__ float s_max[RM2S_TILE_THREADS];

    const int n = blockIdx.z;
    const size_t plane = (size_t)height * (size_t)width;
    const float* img = image + (size_t)n * 3 * plane;
    const TB* b1 = stage1 + (size_t)n * 3 * plane;
    const int x0 = blockIdx.x * RM2S_TILE_W;
    const int y0 = blockIdx.y * RM2S_TILE_H;
    const int tid = threadIdx.y * RM2S_TILE_W + threadIdx.x;

    for (int i = tid; i < RM2S_SHARED_H * RM2S_SHARED_W; i += RM2S_TILE_THREADS) {
        const int ty = i / RM2S_SHARED_W;
        const int tx = i % RM2S_SHARED_W;
        const int y = rm2s_reflect101(y0 + ty - RM2S_HALO, height);
        const int x = rm2s_reflect101(x0 + tx - RM2S_HALO, width);
        const size_t p = (size_t)y * width + x;
        s_gray_i[ty][tx] = rm2s_gray(img[p], img[p + plane], img[p + 2 * plane]);
        s_gray_b[ty][tx] = rm2s_gray(rm2s_load(b1, p), rm2s_load(b1, p + plane), rm2s_load(b1, p + 2 * plane));
    }
    __syncthreads();

    for (int i = tid; i < RM2S_SHARED_H * RM2S_TILE_W; i += RM2S_TILE_THREADS) {
        const int ty = i / RM2S_TILE_W;
        const int tx = i % RM2S_TILE_W;
        float a[5], b[5], d[5];
        for (int k = 0; k < 5; ++k) {
            a[k] = s_gray_i[ty][tx + k];
            b[k] = s_gray_b[ty][tx + k];
            d[k] = __fsub_rn(a[k], b[k]);
        }
        s_rows[0][ty][tx] = rm2s_smooth5(a[0], a[1], a[2], a[3], a[4]);
        s_rows[1][ty][tx] = rm2s_deriv5(a[0], a[1], a[3], a[4]);
        s_rows[2][ty][tx] = rm2s_smooth5(b[0], b[1], b[2], b[3], b[4]);
        s_rows[3][ty][tx] = rm2s_deriv5(b[0], b[1], b[3], b[4]);
        s_rows[4][ty][tx] = rm2s_smooth5(d[0], d[1], d[2], d[3], d[4]);
        s_rows[5][ty][tx] = rm2s_deriv5(d[0], d[1], d[3], d[4]);
    }
    __syncthreads();

    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int x = x0 + tx;
    const int y = y0 + ty;
    float c = 0.0f;
    if (x < width && y < height) {
        float mag[3];
        for (int s = 0; s < 3; ++s) {
            /* gx: column smoothing of the row derivative; gy: column derivative of the row smoothing. */
            const float gx = rm2s_smooth5(s_rows[2 * s + 1][ty][tx], s_rows[2 * s + 1][ty + 1][tx],
                                          s_rows[2 * s + 1][ty + 2][tx], s_rows[2 * s + 1][ty + 3][tx],
                                          s_rows[2 * s + 1][ty + 4][tx]);
            const float gy = rm2s_deriv5(s_rows[2 * s][ty][tx], s_rows[2 * s][ty + 1][tx],
                                         s_rows[2 * s][ty + 3][tx], s_rows[2 * s][ty + 4][tx]);
            mag[s] = sqrtf(__fadd_rn(__fmul_rn(gx, gx), __fmul_rn(gy, gy)));
        }
        const bool m = mag[0] > gradient_threshold;
        c = m ? log1pf(__fdiv_rn(mag[2], __fadd_rn(mag[1], eps))) : 0.0f;
        const size_t p = (size_t)n * plane + (size_t)y * width + x;
        confidence[p] = c;
        if (gradient_mask) gradient_mask[p] = m ? 1 : 0;
    }

    s_max[tid] = c;
    __syncthreads();
    for (int s = RM2S_TILE_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) s_max[tid] = fmaxf(s_max[tid], s_max[tid + s]);
        __syncthreads();
    }
    if (tid == 0 && s_max[0] > 0.0f) atomicMax(&max_bits[n], __float_as_int(s_max[0]));
}

extern "C" __global__ void __launch_bounds__(RM2S_TILE_THREADS)
rm2s_confidence_f32(
    const float* __restrict__ image, const float* __restrict__ stage1, int height, int width,
    float gradient_threshold, float eps, float* __restrict__ confidence,
    unsigned char* __restrict__ gradient_mask, int* __restrict__ max_bits)
{
    rm2s_confidence_impl<float>(image, stage1, height, width, gradient_threshold, eps, confidence, gradient_mask,
                                max_bits);
}

extern "C" __global__ void __launch_bounds__(RM2S_TILE_THREADS)
rm2s_confidence_b1f16(
    const float* __restrict__ image, const unsigned short* __restrict__ stage1, int height, int width,
    float gradient_threshold, float eps, float* __restrict__ confidence,
    unsigned char* __restrict__ gradient_mask, int* __restrict__ max_bits)
{
    rm2s_confidence_impl<unsigned short>(image, stage1, height, width, gradient_threshold, eps, confidence,
                                         gradient_mask, max_bits);
}

extern "C" __global__ void __launch_bounds__(RM2S_HIST_THREADS)
rm2s_histogram(
    const float* __restrict__ confidence, int height, int width, const int* __restrict__ max_bits,
    unsigned int* __restrict__ hist_count, double* __restrict__ hist_sum)
{
    __shared__ unsigned int s_count[RM2S_BINS];
    __shared__ float s_sum[RM2S_BINS];

    const int n = blockIdx.z;
    const size_t plane = (size_t)height * (size_t)width;
    const float* conf = confidence + (size_t)n * plane;

    for (int b = threadIdx.x; b < RM2S_BINS; b += blockDim.x) {
        s_count[b] = 0;
        s_sum[b] = 0.0f;
    }
    __syncthreads();

    const float max_value = __int_as_float(max_bits[n]);
    if (max_value > 0.0f) {
        const float scale = (float)RM2S_BINS / max_value;
        const size_t stride = (size_t)gridDim.x * blockDim.x;
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < plane; i += stride) {
            const float v = conf[i];
            if (v > 0.0f) {
                /* Clamp in float first: v * scale may be inf when max is subnormal. */
                const float f = v * scale;
                const int b = f >= (float)(RM2S_BINS - 1) ? RM2S_BINS - 1 : (int)f;
                atomicAdd(&s_count[b], 1u);
                atomicAdd(&s_sum[b], v);
            }
        }
    }
    __syncthreads();

    unsigned int* count = hist_count + (size_t)n * RM2S_BINS;
    double* sum = hist_sum + (size_t)n * RM2S_BINS;
    for (int b = threadIdx.x; b < RM2S_BINS; b += blockDim.x) {
        if (s_count[b] != 0) {
            atomicAdd(&count[b], s_count[b]);
            atomicAdd(&sum[b], (double)s_sum[b]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(RM2S_SCAN_THREADS)
rm2s_two_means(
    unsigned int* __restrict__ hist_count, double* __restrict__ hist_sum, int* __restrict__ max_bits,
    float c1, float c2, float* __restrict__ result)
{
    /* Inclusive scan of (count, sum) per thread; reused for the best split's left side. */
    __shared__ unsigned int s_count[RM2S_SCAN_THREADS];
    __shared__ double s_sum[RM2S_SCAN_THREADS];
    __shared__ double s_score[RM2S_SCAN_THREADS];
    __shared__ int s_split[RM2S_SCAN_THREADS];

    const int n = blockIdx.x;
    const int t = threadIdx.x;
    unsigned int* count = hist_count + (size_t)n * RM2S_BINS;
    double* sum = hist_sum + (size_t)n * RM2S_BINS;

    unsigned int bin_count[RM2S_BINS_PER_THREAD];
    double bin_sum[RM2S_BINS_PER_THREAD];
    unsigned int own_count = 0;
    double own_sum = 0.0;
    for (int j = 0; j < RM2S_BINS_PER_THREAD; ++j) {
        const int b = t * RM2S_BINS_PER_THREAD + j;
        bin_count[j] = count[b];
        bin_sum[j] = sum[b];
        /* Leave the histogram zeroed for the next frame. */
        count[b] = 0;
        sum[b] = 0.0;
        own_count += bin_count[j];
        own_sum += bin_sum[j];
    }
    s_count[t] = own_count;
    s_sum[t] = own_sum;
    __syncthreads();

    for (int offset = 1; offset < RM2S_SCAN_THREADS; offset <<= 1) {
        unsigned int c = s_count[t];
        double s = s_sum[t];
        if (t >= offset) {
            c += s_count[t - offset];
            s += s_sum[t - offset];
        }
        __syncthreads();
        s_count[t] = c;
        s_sum[t] = s;
        __syncthreads();
    }

    const unsigned int total_count = s_count[RM2S_SCAN_THREADS - 1];
    const double total_sum = s_sum[RM2S_SCAN_THREADS - 1];
    unsigned int left_count = s_count[t] - own_count;
    double left_sum = s_sum[t] - own_sum;

    /* Split k puts bins [0, k) on the left; score -1 marks "no split with both sides". */
    double best_score = -1.0;
    int best_split = -1;
    unsigned int best_count = 0;
    double best_sum = 0.0;
    for (int j = 0; j < RM2S_BINS_PER_THREAD; ++j) {
        left_count += bin_count[j];
        left_sum += bin_sum[j];
        const int k = t * RM2S_BINS_PER_THREAD + j + 1;
        if (k < RM2S_BINS && left_count > 0 && left_count < total_count) {
            const double right_count = (double)(total_count - left_count);
            const double right_sum = total_sum - left_sum;
            const double score = left_sum * left_sum / (double)left_count + right_sum * right_sum / right_count;
            if (score > best_score) {
                best_score = score;
                best_split = k;
                best_count = left_count;
                best_sum = left_sum;
            }
        }
    }
    __syncthreads();
    s_score[t] = best_score;
    s_split[t] = best_split;
    s_count[t] = best_count;
    s_sum[t] = best_sum;
    __syncthreads();

    for (int s = RM2S_SCAN_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            const double other = s_score[t + s];
            if (other > s_score[t] || (other == s_score[t] && s_split[t + s] < s_split[t])) {
                s_score[t] = other;
                s_split[t] = s_split[t + s];
                s_count[t] = s_count[t + s];
                s_sum[t] = s_sum[t + s];
            }
        }
        __syncthreads();
    }

    if (t == 0) {
        double low = 0.0;
        double high = 0.0;
        if (s_split[0] >= 0) {
            low = s_sum[0] / (double)s_count[0];
            high = (total_sum - s_sum[0]) / (double)(total_count - s_count[0]);
        } else if (total_count > 0) {
            low = total_sum / (double)total_count;
            high = low;
        }
        const double spread = high - low;
        const float max_value = __int_as_float(max_bits[n]);
        float* r = result + (size_t)n * RM2S_RESULT_SIZE;
        r[0] = (float)low;
        r[1] = (float)high;
        r[2] = (float)(low + (double)c2 * spread);
        r[3] = (float)(high - (double)c1 * spread);
        r[4] = max_value;
        r[5] = (float)total_count;
        r[6] = (float)s_split[0];
        r[7] = max_value / (float)RM2S_BINS;
        max_bits[n] = 0;
    }
}

template <typename TO>
__device__ void rm2s_stage2_input_impl(const float* __restrict__ image, const float* __restrict__ confidence,
                                       const float* __restrict__ result, int height, int width,
                                       TO* __restrict__ out, unsigned char* __restrict__ mask_background,
                                       unsigned char* __restrict__ mask_reflection)
{
    const int n = blockIdx.z;
    const size_t plane = (size_t)height * (size_t)width;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= plane) return;

    const float* r = result + (size_t)n * RM2S_RESULT_SIZE;
    const float c = confidence[(size_t)n * plane + i];
    const bool mb = c > 0.0f && c < r[2];
    const bool mr = c > r[3];
    const float* img = image + (size_t)n * 3 * plane;
    TO* o = out + (size_t)n * 9 * plane;
    for (int ch = 0; ch < 3; ++ch) {
        const float v = img[(size_t)ch * plane + i];
        rm2s_store(o, (size_t)ch * plane + i, v);
        rm2s_store(o, (size_t)(3 + ch) * plane + i, mb ? v : 0.0f);
        rm2s_store(o, (size_t)(6 + ch) * plane + i, mr ? v : 0.0f);
    }
    if (mask_background) mask_background[(size_t)n * plane + i] = mb ? 1 : 0;
    if (mask_reflection) mask_reflection[(size_t)n * plane + i] = mr ? 1 : 0;
}

extern "C" __global__ void __launch_bounds__(RM2S_STAGE2_THREADS)
rm2s_stage2_input_f32(
    const float* __restrict__ image, const float* __restrict__ confidence, const float* __restrict__ result,
    int height, int width, float* __restrict__ out, unsigned char* __restrict__ mask_background,
    unsigned char* __restrict__ mask_reflection)
{
    rm2s_stage2_input_impl<float>(image, confidence, result, height, width, out, mask_background, mask_reflection);
}

extern "C" __global__ void __launch_bounds__(RM2S_STAGE2_THREADS)
rm2s_stage2_input_f16(
    const float* __restrict__ image, const float* __restrict__ confidence, const float* __restrict__ result,
    int height, int width, unsigned short* __restrict__ out, unsigned char* __restrict__ mask_background,
    unsigned char* __restrict__ mask_reflection)
{
    rm2s_stage2_input_impl<unsigned short>(image, confidence, result, height, width, out, mask_background,
                                           mask_reflection);
}
