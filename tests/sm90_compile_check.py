"""Compile fastseg's Triton kernels for an H100 (sm_90) without a GPU, with Triton's bundled ptxas.

The interpreter runs the kernels' Python, not Triton's GPU compiler: some errors (a loop-carried value that
changes shape, a constexpr misuse) only show when compiling for the GPU. Run with TRITON_INTERPRET unset:
    python tests/sm90_compile_check.py
(tests/test_sm90_compile.py runs it in a subprocess.) The MSCA depthwise backward kernels are left out here
(minutes to compile); tests/test_inspect.py builds them at a benchmark shape and checks their resources.
"""
import time

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from fastseg.kernels import (attention_mask, cac, context_cluster, mask_cost, mask_loss, masked_attention, mlp_dwconv,
                             ms_deform_attn, msca, partial_sums, upsample_ce)

TARGET = GPUTarget("cuda", 90, 32)
_CAC_SCALARS = {n: "fp32" for n in ("tau", "eps", "smooth", "ls_eps")}


def compile_for_sm90(kernel, pointers: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                     scalars: dict | None = None):
    fn = kernel
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap @triton.autotune
        fn = fn.fn
    scalars = scalars or {}
    sig = {a: "constexpr" if a in constexprs else ("*" + pointers[a] if a in pointers else
                                                   scalars.get(a, "fp32" if "scale" in a else "i32"))
           for a in fn.arg_names}
    t = time.time()
    triton.compile(triton.compiler.ASTSource(fn, sig, constexprs=constexprs), target=TARGET,
                   options={"num_warps": num_warps, "num_stages": num_stages})
    print(f"{fn.__name__}: ok ({time.time() - t:.1f} s)", flush=True)


def main():
    dt = "fp16"
    K = masked_attention
    for has_mask, dropout in ((True, False), (False, True)):
        c = dict(HAS_MASK=has_mask, DROPOUT=dropout, PRECISION="ieee", ACC=tl.float32, BLOCK_D=32, BLOCK_M=64,
                 BLOCK_N=64)
        qkv = {"Q": dt, "K": dt, "V": dt, "Mask": "i32", "Seed": "i64"}
        compile_for_sm90(K._fwd_kernel, {**qkv, "Blocks": "i32", "Counts": "i32", "Acc": "fp32", "Mx": "fp32",
                                         "Lsum": "fp32"}, c)
        bwd = {**qkv, "DO": dt, "O": dt, "LSE": "fp32", "Delta": "fp32", "DL": "fp32"}
        lg = dict(c, LOGITS_GRAD=dropout)  # the ATM attention's logits gradient, with the dropout variant
        compile_for_sm90(K._bwd_dq_kernel, {**bwd, "Blocks": "i32", "Counts": "i32", "DQ": "fp32"}, lg)
        compile_for_sm90(K._bwd_dkdv_kernel, {**bwd, "Flags": "i8", "DK": dt, "DV": dt, "DQP": "fp32", "DQ": dt},
                         dict(lg, SUB_M=32))
        compile_for_sm90(K._atm_logits_kernel, {"Q": dt, "K": dt, "Logits": "fp32"},
                         {k_: c[k_] for k_ in ("PRECISION", "ACC", "BLOCK_D", "BLOCK_M", "BLOCK_N")})
        w = {"Q": dt, "K": dt, "LSE": "fp32", "Mask": "i32", "Seed": "i64"}
        compile_for_sm90(K._weights_kernel, {**w, "W": dt}, dict(c, AVERAGE=has_mask))
        for kern in (K._weights_bwd_dq_kernel, K._weights_bwd_dk_kernel):
            compile_for_sm90(kern, {**w, "DW": dt, "R": "fp32", "DQ": dt, "DK": dt}, c, 8, 2)  # as launched
    compile_for_sm90(K._combine_kernel, {"Acc": "fp32", "Mx": "fp32", "Lsum": "fp32", "O": dt, "LSE": "fp32"},
                     dict(ACC=tl.float32, BLOCK_D=32, BLOCK_M=64))
    compile_for_sm90(K._keep_mask_kernel, {"Seed": "i64", "Keep": "i8"}, dict(BLOCK_M=64, BLOCK_N=64))
    compile_for_sm90(K._tile_list_kernel, {"Mask": "i32", "Blocks": "i32", "Counts": "i32", "Flags": "i8"},
                     dict(BLOCK_M=64, WORDS_PER_BLOCK=2, CHUNK=64))
    compile_for_sm90(K._pack_kernel, {"AM": "u8", "KPM": "u8", "Bits": "i32"},
                     dict(HAS_AM=True, AM_MASKED=True, HAS_KPM=True, KPM_MASKED=True, BLOCK_W=64))
    compile_for_sm90(K._pack_tile_list_kernel, {"AM": "u8", "KPM": "u8", "Bits": "i32", "Blocks": "i32",
                                                "Counts": "i32", "Flags": "i8"},
                     dict(HAS_AM=True, AM_MASKED=True, HAS_KPM=True, KPM_MASKED=True, BLOCK_M=64, WORDS_PER_BLOCK=2,
                          CHUNK=8), 8)
    compile_for_sm90(attention_mask._sign_pack_kernel, {"E": dt, "F": dt, "Bits": "i32", "Counts": "i32"},
                     dict(PRECISION="ieee", ACC=tl.float32, BLOCK_Q=64, BLOCK_W=4, BLOCK_C=32))
    compile_for_sm90(attention_mask._reset_empty_kernel, {"Bits": "i32", "Counts": "i32"}, dict(BLOCK_W=256))
    cc = context_cluster
    for m in (4, 16):  # loops over the centers; tl.dot path
        c = dict(cc.launch_meta(torch.float16, 24, m, return_center=False), BLOCK_N=64)
        compile_for_sm90(cc._coc_fwd_kernel, {"x_ptr": dt, "v_ptr": dt, "alpha_ptr": "fp32", "beta_ptr": "fp32",
                                              "out_ptr": dt, "assign_ptr": "i32", "sim_ptr": "fp32", "cen_ptr": "fp32",
                                              "agg_ptr": "fp32", "den_ptr": "fp32"}, c)
        compile_for_sm90(cc._coc_bwd_kernel, {"x_ptr": dt, "v_ptr": dt, "g_ptr": dt, "alpha_ptr": "fp32",
                                              "dx_ptr": dt, "dv_ptr": dt, "dalpha_ptr": "fp32", "dbeta_ptr": "fp32",
                                              "assign_ptr": "i32", "sim_ptr": "fp32", "cen_ptr": "fp32",
                                              "agg_ptr": "fp32", "den_ptr": "fp32", "tmp_ptr": "fp32",
                                              "dcos_ptr": "fp32", "dmat_ptr": "fp32", "chat_ptr": "fp32"}, c)
    nchw = dict(BC=1, BP=1024, sxw=1, syw=1)
    D = mlp_dwconv
    compile_for_sm90(D._dwgelu_fwd_kernel, {"x_ptr": dt, "w_ptr": "fp32", "b_ptr": "fp32", "y_ptr": dt},
                     dict(ACC=tl.float32, **nchw))
    compile_for_sm90(D._dwgelu_bwd_dz_kernel, {"x_ptr": dt, "gy_ptr": dt, "w_ptr": "fp32", "b_ptr": "fp32",
                                               "dz_ptr": dt, "part_ptr": "fp32"}, dict(ACC=tl.float32, **nchw))
    compile_for_sm90(D._dwgelu_bwd_dx_kernel, {"dz_ptr": dt, "w_ptr": "fp32", "dx_ptr": dt},
                     dict(ACC=tl.float32, **nchw))
    M = msca
    compile_for_sm90(M._msca_dw_fwd_kernel, {"x_ptr": dt, "s_ptr": dt, "wp_ptr": "fp32", "scr_ptr": "fp32"},
                     dict(BC=1, RH=64, RW=64, PH=10, PW=10, WP=128, ACC=tl.float32, M=10, sxw=1, ssw=1), 16)
    compile_for_sm90(M._msca_pw_fwd_kernel, {"s_ptr": dt, "x_ptr": dt, "w_ptr": dt, "b_ptr": "fp32", "y_ptr": dt},
                     dict(PREC="ieee", ACC=tl.float32, BP=128, BJ=128, BK=32), 8)
    compile_for_sm90(M._msca_pw_bwd_kernel, {"g_ptr": dt, "x_ptr": dt, "s_ptr": dt, "w_ptr": dt, "b_ptr": "fp32",
                                             "ds_ptr": "fp32", "dxd_ptr": "fp32"},
                     dict(PREC="ieee", ACC=tl.float32, BP=64, BJ=128, BK=64))
    compile_for_sm90(M._msca_w3_bwd_kernel, {"g_ptr": dt, "x_ptr": dt, "s_ptr": dt, "part_ptr": "fp32"},
                     dict(PREC="ieee", ACC=tl.float32, BO=128, BC=128, BM=32), 8)
    compile_for_sm90(M._msca_fused_fwd_kernel, {"x_ptr": dt, "s_ptr": dt, "y_ptr": dt, "wp_ptr": "fp32",
                                                "w3_ptr": dt, "b3_ptr": "fp32", "scr_ptr": "fp32"},
                     dict(BC=1, RH=64, RW=64, PH=10, PW=10, WP=128, ACC=tl.float32, M=10, CP=32, OWP=64, GR=2,
                          PREC="ieee", sxw=1, ssw=1, sow=1), 16)
    compile_for_sm90(M._msca_pw_w3_bwd_kernel, {"g_ptr": dt, "x_ptr": dt, "s_ptr": dt, "w_ptr": dt, "b_ptr": "fp32",
                                                "ds_ptr": dt, "dxd_ptr": dt, "part_ptr": "fp32"},
                     dict(PREC="ieee", ACC=tl.float32, CP=64, BP=64, DS_ONLY=False), 8)
    U = upsample_ce
    compile_for_sm90(U._upce_fwd_kernel, {"x_ptr": dt, "t_ptr": "i64", "loss_ptr": "fp32", "lse_ptr": "fp32"},
                     dict(ALIGN=False, ACC=tl.float32, BP=64, BK=32))
    compile_for_sm90(U._upce_bwd_kernel, {"x_ptr": dt, "t_ptr": "i64", "lse_ptr": "fp32", "g_ptr": "fp32",
                                          "dx_ptr": "fp32"}, dict(ALIGN=True, ACC=tl.float32, BP=64, BK=16))

    L = mask_loss  # MaskFormer's upsample + focal + dice (targets uint8), at the launchers' GPU blocks
    c = dict(USE_ALPHA=True, GAMMA=2.0, ACC=tl.float32)
    compile_for_sm90(L._mask_loss_fwd_kernel, {"x_ptr": dt, "t_ptr": "u8", "rows_ptr": "i64", "part_ptr": "fp32"},
                     dict(c, BP=1024), scalars={"alpha": "fp32"})
    compile_for_sm90(L._mask_loss_bwd_kernel, {"x_ptr": dt, "t_ptr": "u8", "rows_ptr": "i64", "g_ptr": "fp32",
                                               "dx_ptr": dt}, dict(c, BI=32, BJ=32, BO=16), num_stages=1,
                     scalars={"alpha": "fp32"})
    # MaskFormer matcher costs: from the logits and from embeddings x features (16-bit: hi/lo split dots)
    mc = {"X": dt, "E": dt, "F": dt, "Meta": "i64", "Part": "fp32"}
    q, p, c, warps = mask_cost.GPU_BLOCKS[False]
    for emb in (False, True):
        compile_for_sm90(mask_cost._mask_cost_kernel, mc,
                         dict(FROM_EMBED=emb, TG=tl.uint8, LOGIT_PREC="native", COST_PREC="split", OPD=tl.float16,
                              ACC=tl.float32, ALPHA=0.25, BLOCK_Q=q, BLOCK_T=32, BLOCK_P=p, BLOCK_C=c), warps, 2)
    compile_for_sm90(mask_cost._mask_cost_finalize_kernel, {"Part": "fp32", "Meta": "i64", "Focal": "fp32",
                                                            "Dice": "fp32"}, dict(TG=tl.uint8, BLOCK=256))

    # CAC's classifier at K = 150 (class tile 256), the GPU block sizes of kernels/cac.py for 16-bit features
    Z = cac
    bp, bc, warps = Z._blocks("proto_fwd", 150)
    for hard in (False, True):
        compile_for_sm90(Z._proto_fwd_kernel, {"f_ptr": dt, "z_ptr": dt, "y_ptr": "i64", "acc_ptr": "fp32",
                                               "den_ptr": "fp32", "lse_ptr": "fp32"},
                         dict(HARD=hard, PREC="ieee", ACC=tl.float32, KP=256, BP=bp, BC=bc), warps, scalars=_CAC_SCALARS)
    bp, bc, warps = Z._blocks("proto_bwd", 150)
    compile_for_sm90(Z._proto_bwd_kernel, {"f_ptr": dt, "z_ptr": dt, "y_ptr": "i64", "lse_ptr": "fp32",
                                           "da_ptr": "fp32", "dd_ptr": "fp32", "df_ptr": dt, "dz_ptr": dt},
                     dict(HARD=False, PREC="ieee", ACC=tl.float32, KP=256, BP=bp, BC=bc), warps, scalars=_CAC_SCALARS)
    bk, bp, bc, warps = Z._blocks("cos_fwd", 150)
    compile_for_sm90(Z._cos_fwd_kernel, {"f_ptr": dt, "q_ptr": dt, "rq_ptr": "fp32", "out_ptr": dt, "nf_ptr": "fp32"},
                     dict(CLAMP=False, PREC="ieee", ACC=tl.float32, BK=bk, BP=bp, BC=bc), warps, scalars=_CAC_SCALARS)
    bk, bp, bc, warps = Z._blocks("cos_df", 150)
    compile_for_sm90(Z._cos_bwd_df_kernel, {"f_ptr": dt, "q_ptr": dt, "rq_ptr": "fp32", "nf_ptr": "fp32", "g_ptr": dt,
                                            "o_ptr": dt, "df_ptr": dt, "t_ptr": "fp32"},
                     dict(CLAMP=True, PREC="ieee", ACC=tl.float32, BK=bk, BP=bp, BC=bc), warps, scalars=_CAC_SCALARS)
    bk, bp, bc, warps = Z._blocks("cos_dq", 150)
    compile_for_sm90(Z._cos_bwd_dq_kernel, {"f_ptr": dt, "g_ptr": dt, "nf_ptr": "fp32", "acc_ptr": "fp32"},
                     dict(CLAMP=False, PREC="ieee", ACC=tl.float32, BK=bk, BP=bp, BC=bc), warps, scalars=_CAC_SCALARS)
    bk, bp, warps = Z._blocks("distill", 150)
    compile_for_sm90(Z._distill_fwd_kernel, {"x_ptr": dt, "t_ptr": dt, "y_ptr": "i64", "part_ptr": "fp32",
                                             "stat_ptr": "fp32"}, dict(ACC=tl.float32, BK=bk, BP=bp), warps, scalars=_CAC_SCALARS)
    compile_for_sm90(Z._distill_bwd_kernel, {"x_ptr": dt, "t_ptr": dt, "y_ptr": "i64", "stat_ptr": "fp32",
                                             "w_ptr": "fp32", "dx_ptr": dt}, dict(ACC=tl.float32, BK=bk, BP=bp), warps, scalars=_CAC_SCALARS)

    compile_for_sm90(partial_sums._sum_rows_kernel, {"part_ptr": "fp32", "out_ptr": dt}, dict(BR=8, BL=256))

    # multi-scale deformable attention at the Mask2Former encoder's head dim (32) and 64, 4 points; FUSED =
    # softmax + location arithmetic in the kernel (the module path)
    A = ms_deform_attn
    io = {"V": dt, "Shapes": "i64", "Starts": "i64", "Loc": dt, "Attn": dt, "Ref": dt, "Stats": "fp32"}
    for D, fused in ((32, False), (32, True), (64, True)):
        c = dict(D=D, P=4, FUSED=fused, ACC=tl.float32)
        bq, bd, warps = A.block_sizes(D, 1 << 20, False)
        compile_for_sm90(A._msda_fwd_kernel, {**io, "Out": dt}, dict(c, BLOCK_Q=bq, BLOCK_D=bd), warps)
        bq, bd, warps = A.block_sizes(D, 1 << 20, True)
        compile_for_sm90(A._msda_bwd_kernel, {**io, "GO": dt, "GV": "fp32", "GLoc": dt, "GAttn": "fp32"},
                         dict(c, BLOCK_Q=bq, BLOCK_D=bd), warps)


if __name__ == "__main__":
    main()
