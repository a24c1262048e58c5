/* A library-free testbench for refbnn's C golden headers (tests/test_golden_formats.py).
 *
 * It reimplements a few ops the way a C or HLS port would -- sign, LCE-style 32-bit packing, a
 * binary convolution on the packed 32-bit words (XOR + popcount, every pad value), its float output
 * transform, and a float Linear layer -- and checks each against the headers with the header-only
 * checker. Build: cc -std=c99 -I OUT/c golden_check.c. Exit status 0: all match; 1: a mismatch.
 * -DBROKEN=1 puts sign(0) at -1, -DBROKEN=2 pads with 0 instead of the case's pad value,
 * -DBROKEN=3 moves one Linear output by 1e-3 relative (beyond its 1e-5 tolerance): each variant
 * must fail exactly the checks it touches.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ops/sign_sazp1.h"
#include "ops/pack_c100_w32_sazp1.h"
#include "ops/bconv_same_s2_odd.h"
#include "ops/bconv_same_plus1_s2_odd_c40.h"
#include "ops/bconv_explicit_minus1_dil2.h"
#include "ops/bconv_output_plus1_s2_odd_c64.h"
#include "layers/linear_bias.h"

#ifndef BROKEN
#define BROKEN 0
#endif

static int is_plus(float v) { return BROKEN == 1 ? v > 0.0f : !(v < 0.0f); } /* sign_at_zero +1 */

static int popcount32(uint32_t v) {
    int c = 0;
    while (v) { v &= v - 1u; c++; }
    return c;
}

/* acc[n][i][j][o] over packed words x (N,H,W,G,NW) and w (O,KH,KW,NW), bit 1 = -1 */
static void bconv_packed(const uint32_t *x, const uint32_t *w, int n_, int h, int wd, int g_,
                         int nw, int o_, int kh, int kw, int sh, int sw, int dh, int dw, int pt,
                         int pl, int oh, int ow, int cg, int pad_value, int32_t *acc) {
    int og = o_ / g_;
    if (BROKEN == 2) pad_value = 0;
    for (int n = 0; n < n_; n++)
        for (int i = 0; i < oh; i++)
            for (int j = 0; j < ow; j++)
                for (int o = 0; o < o_; o++) {
                    int g = o / og, k = 0, pc = 0;
                    for (int a = 0; a < kh; a++)
                        for (int b = 0; b < kw; b++) {
                            int y = i * sh + a * dh - pt, xx = j * sw + b * dw - pl;
                            const uint32_t *wp = w + ((o * kh + a) * kw + b) * nw;
                            int inside = y >= 0 && y < h && xx >= 0 && xx < wd;
                            if (!inside && pad_value == 0) continue; /* padded taps add nothing */
                            k += cg;
                            if (inside) {
                                const uint32_t *xp = x + (((n * h + y) * wd + xx) * g_ + g) * nw;
                                for (int q = 0; q < nw; q++) pc += popcount32(xp[q] ^ wp[q]);
                            } else { /* a padded tap: +1 (bit 0) or -1 (bit 1) in all cg channels */
                                int ones = 0;
                                for (int q = 0; q < nw; q++) ones += popcount32(wp[q]);
                                pc += pad_value == 1 ? ones : cg - ones;
                            }
                        }
                    acc[((n * oh + i) * ow + j) * o_ + o] = k - 2 * pc;
                }
}

#define BCONV_CASE(C, c, accbuf)                                                              \
    bconv_packed(c##_derived_x_words32, c##_derived_kernel_words32, C##_IN_X_DIM0,            \
                 C##_IN_X_DIM1, C##_IN_X_DIM2, C##_DERIVED_X_WORDS32_DIM3,                    \
                 C##_DERIVED_X_WORDS32_DIM4, C##_IN_KERNEL_DIM3, C##_IN_KERNEL_DIM0,          \
                 C##_IN_KERNEL_DIM1, C##_P_STRIDE_0, C##_P_STRIDE_1, C##_P_DILATION_0,        \
                 C##_P_DILATION_1, C##_P_PAD_TOP, C##_P_PAD_LEFT, C##_OUT_ACC_DIM1,           \
                 C##_OUT_ACC_DIM2, C##_P_CG, C##_P_PAD_VALUE, accbuf)

static int32_t acc_buf[4096];
static float y_buf[4096];

int main(void) {
    int bad = 0;
    {   /* sign */
        int8_t y[RG_OPS_SIGN_SAZP1_IN_X_SIZE];
        for (int i = 0; i < RG_OPS_SIGN_SAZP1_IN_X_SIZE; i++)
            y[i] = is_plus(rg_ops_sign_sazp1_in_x[i]) ? 1 : -1;
        bad |= rg_ops_sign_sazp1_check_y(y);
    }
    {   /* pack: value c in word c / 32, bit c % 32, bit 1 = -1 */
        enum { ROWS = RG_OPS_PACK_C100_W32_SAZP1_IN_X_DIM0, C = RG_OPS_PACK_C100_W32_SAZP1_IN_X_DIM1,
               NW = RG_OPS_PACK_C100_W32_SAZP1_OUT_WORDS_DIM1 };
        uint32_t words[ROWS * NW];
        memset(words, 0, sizeof words);
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < C; c++)
                if (!is_plus(rg_ops_pack_c100_w32_sazp1_in_x[r * C + c]))
                    words[r * NW + c / 32] |= 1u << (c % 32);
        bad |= rg_ops_pack_c100_w32_sazp1_check_words(words);
    }
    BCONV_CASE(RG_OPS_BCONV_SAME_S2_ODD, rg_ops_bconv_same_s2_odd, acc_buf);
    bad |= rg_ops_bconv_same_s2_odd_check_acc(acc_buf);
    BCONV_CASE(RG_OPS_BCONV_SAME_PLUS1_S2_ODD_C40, rg_ops_bconv_same_plus1_s2_odd_c40, acc_buf);
    bad |= rg_ops_bconv_same_plus1_s2_odd_c40_check_acc(acc_buf);
    BCONV_CASE(RG_OPS_BCONV_EXPLICIT_MINUS1_DIL2, rg_ops_bconv_explicit_minus1_dil2, acc_buf);
    bad |= rg_ops_bconv_explicit_minus1_dil2_check_acc(acc_buf);
    {   /* output transform: y = float32(float32(acc) * m) + b, two roundings, no FMA */
        BCONV_CASE(RG_OPS_BCONV_OUTPUT_PLUS1_S2_ODD_C64, rg_ops_bconv_output_plus1_s2_odd_c64, acc_buf);
        bad |= rg_ops_bconv_output_plus1_s2_odd_c64_check_acc(acc_buf);
        int o_ = RG_OPS_BCONV_OUTPUT_PLUS1_S2_ODD_C64_IN_KERNEL_DIM3;
        for (int i = 0; i < RG_OPS_BCONV_OUTPUT_PLUS1_S2_ODD_C64_OUT_ACC_SIZE; i++) {
            volatile float prod = (float)acc_buf[i] * rg_ops_bconv_output_plus1_s2_odd_c64_in_multiplier[i % o_];
            y_buf[i] = prod + rg_ops_bconv_output_plus1_s2_odd_c64_in_bias[i % o_];
        }
        bad |= rg_ops_bconv_output_plus1_s2_odd_c64_check_y(y_buf);
    }
    {   /* float Linear: y = x @ w.T + b, within the case's tolerance */
        enum { N = RG_LAYERS_LINEAR_BIAS_IN_X_DIM0, K = RG_LAYERS_LINEAR_BIAS_IN_X_DIM1,
               M = RG_LAYERS_LINEAR_BIAS_IN_WEIGHT_DIM0 };
        float y[N * M];
        for (int n = 0; n < N; n++)
            for (int m = 0; m < M; m++) {
                float s = rg_layers_linear_bias_in_bias[m];
                for (int k = 0; k < K; k++)
                    s += rg_layers_linear_bias_in_x[n * K + k] * rg_layers_linear_bias_in_weight[m * K + k];
                y[n * M + m] = s;
            }
        if (BROKEN == 3) y[1] *= 1.001f;
        bad |= rg_layers_linear_bias_check_y(y);
    }
    printf(bad ? "golden C check: FAILED\n" : "golden C check: all match\n");
    return bad;
}
