"""SegViT reference: key names, the heads against a line-by-line transcription of the official code (fp64), the
ATM loss against hand-written formulas, the mmseg ViT against a timm-style forward, shapes, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import TransformerDecoder, TransformerDecoderLayer

from fastseg.models import (ATMHead, ATMLoss, ATMSingleHead, TPNATMHead, ViTShrink, ViTShrunkPlus, VisionTransformer,
                            build_segvit, segvit_vit_b)
from fastseg.models.atm_head import d3_to_d4
from fastseg.models.vit_shrunk_plus import edge_targets
from fastseg.reference import ATMAttention

# --------------------------------------------------------------------------------------------------------------
# Transcription of the official code (zbwxp/SegVit decode_heads/atm_head.py, atm_single_head.py, tpn_atm_head.py),
# mmseg's BaseDecodeHead reduced to what the state_dict shows (loss_decode.criterion.empty_weight).
# --------------------------------------------------------------------------------------------------------------


class _Crit(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.register_buffer("empty_weight", torch.ones(k + 1))


class _LossDecode(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.criterion = _Crit(k)


class _OffDecoder(TransformerDecoder):
    def __init__(self, layer, n, all_=False):
        super().__init__(layer, n)
        self.all_ = all_

    def forward(self, tgt, memory, **kw):
        output = tgt
        attns, outputs = [], []
        for mod in self.layers:
            output, attn = mod(output, memory)
            attns.append(attn)
            outputs.append(output)
        if self.all_:
            return outputs, attns
        return output, attn


class _OffLayer(TransformerDecoderLayer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        del self.multihead_attn
        self.multihead_attn = ATMAttention(kwargs["d_model"], num_heads=kwargs["nhead"], qkv_bias=True, attn_drop=0.1)

    def forward(self, tgt, memory, **kw):
        tgt2 = self.self_attn(tgt, tgt, tgt)[0]
        tgt = tgt + self.dropout1(tgt2)
        tgt = self.norm1(tgt)
        tgt2, attn2 = self.multihead_attn(tgt.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1))
        tgt = tgt + self.dropout2(tgt2)
        tgt = self.norm2(tgt)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        tgt = tgt + self.dropout3(tgt2)
        tgt = self.norm3(tgt)
        return tgt, attn2


def _off_d3_to_d4(t):
    n, hw, c = t.size()
    if hw % 2 != 0:
        t = t[:, 1:]
    h = w = int(math.sqrt(hw))
    return t.transpose(1, 2).reshape(n, c, h, w)


def _off_d4_to_d3(t):
    return t.flatten(-2).transpose(-1, -2)


def _off_semantic_inference(mask_cls, mask_pred):
    mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
    mask_pred = mask_pred.sigmoid()
    return torch.einsum("bqc,bqhw->bchw", mask_cls, mask_pred)


class _OffATMHead(nn.Module):
    def __init__(self, img_size, in_channels, embed_dims, num_layers, num_heads, use_stages, num_classes,
                 use_proj=True, single=False):
        super().__init__()
        self.loss_decode = _LossDecode(num_classes)
        self.image_size, self.use_stages, self.single = img_size, use_stages, single
        dim = embed_dims
        self.input_proj, self.proj_norm, self.decoder = [], [], []
        for i in range(use_stages):
            proj = nn.Linear(in_channels, dim) if use_proj else nn.Identity()
            self.add_module("input_proj_{}".format(i + 1), proj)
            self.input_proj.append(proj)
            norm = nn.LayerNorm(dim) if use_proj else nn.Identity()
            self.add_module("proj_norm_{}".format(i + 1), norm)
            self.proj_norm.append(norm)
            decoder = _OffDecoder(_OffLayer(d_model=dim, nhead=num_heads, dim_feedforward=dim * 4), num_layers,
                                  all_=single)
            self.add_module("decoder_{}".format(i + 1), decoder)
            self.decoder.append(decoder)
        self.q = nn.Embedding(num_classes, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)

    def _out(self, qs, attns, maps_size, cumulative):
        qs = torch.stack(qs, dim=0)
        outputs_class = self.class_embed(qs)
        out = {"pred_logits": outputs_class[-1]}
        outputs_seg_masks = []
        size = maps_size[-1]
        for i_attn, attn in enumerate(attns):
            if i_attn == 0 or not cumulative:
                outputs_seg_masks.append(F.interpolate(attn, size=size, mode="bilinear", align_corners=False))
            else:
                outputs_seg_masks.append(outputs_seg_masks[i_attn - 1]
                                         + F.interpolate(attn, size=size, mode="bilinear", align_corners=False))
        out["pred_masks"] = F.interpolate(outputs_seg_masks[-1], size=(self.image_size, self.image_size),
                                          mode="bilinear", align_corners=False)
        out["pred"] = _off_semantic_inference(out["pred_logits"], out["pred_masks"])
        if self.training:
            outputs_seg_masks = torch.stack(outputs_seg_masks, dim=0)
            out["aux_outputs"] = [{"pred_logits": a, "pred_masks": b}
                                  for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1])]
        else:
            return out["pred"]
        return out

    def forward(self, inputs):
        x = []
        for stage_ in inputs[:self.use_stages]:
            x.append(_off_d4_to_d3(stage_) if stage_.dim() > 3 else stage_)
        x.reverse()
        bs = x[0].size()[0]
        attns, maps_size, qs = [], [], []
        if not self.single:
            q = self.q.weight.repeat(bs, 1, 1).transpose(0, 1)
            for x_, proj_, norm_, decoder_ in zip(x, self.input_proj, self.proj_norm, self.decoder):
                lateral = norm_(proj_(x_))
                q, attn = decoder_(q, lateral.transpose(0, 1))
                attn = attn.transpose(-1, -2)
                attn = _off_d3_to_d4(attn)
                maps_size.append(attn.size()[-2:])
                qs.append(q.transpose(0, 1))
                attns.append(attn)
            return self._out(qs, attns, maps_size, cumulative=True)
        laterals = []
        for idx, (x_, proj_, norm_) in enumerate(zip(x, self.input_proj, self.proj_norm)):
            lateral = norm_(proj_(x_))
            if idx == 0:
                laterals.append(lateral)
            elif laterals[idx - 1].size()[1] == lateral.size()[1]:
                laterals.append(lateral + laterals[idx - 1])
            else:
                l_ = F.interpolate(_off_d3_to_d4(laterals[idx - 1]), scale_factor=2, mode="nearest")
                laterals.append(_off_d4_to_d3(l_) + lateral)
        lateral = laterals[-1]
        q = self.q.weight.repeat(bs, 1, 1).transpose(0, 1)
        for idx, decoder_ in enumerate(self.decoder):
            q_, attn_ = decoder_(q, lateral.transpose(0, 1))
            for q, attn in zip(q_, attn_):
                attn = _off_d3_to_d4(attn.transpose(-1, -2))
                maps_size.append(attn.size()[-2:])
                qs.append(q.transpose(0, 1))
                attns.append(attn)
        return self._out(qs, attns, maps_size, cumulative=False)


class _OffTPNATMHead(nn.Module):
    def __init__(self, img_size, in_channels, embed_dims, num_layers, num_heads, use_stages, num_classes,
                 shrink_ratio=16):
        super().__init__()
        self.loss_decode = _LossDecode(num_classes)
        dim = embed_dims
        self.use_stages = use_stages
        self.input_proj, self.proj_norm, self.decoder = [], [], []
        for i in range(use_stages):
            proj = nn.Linear(in_channels, dim)
            self.add_module("input_proj_{}".format(i + 1), proj)
            self.input_proj.append(proj)
            norm = nn.LayerNorm(dim)
            self.add_module("proj_norm_{}".format(i + 1), norm)
            self.proj_norm.append(norm)
            decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(d_model=dim, nhead=num_heads, dim_feedforward=dim * 4), num_layers)
            self.add_module("decoder_{}".format(i + 1), decoder)
            self.decoder.append(decoder)
        self.q = nn.Embedding((img_size // shrink_ratio) ** 2, dim)
        self.atm = _OffATMHead(img_size, in_channels, embed_dims, num_layers, num_heads, 1, num_classes,
                               use_proj=False, single=True)

    def forward(self, inputs):
        x = []
        for stage_ in inputs[:self.use_stages]:
            x.append(_off_d4_to_d3(stage_) if stage_.dim() > 3 else stage_)
        bs = x[0].size()[0]
        q = self.q.weight.repeat(bs, 1, 1).transpose(0, 1)
        for x_, proj_, norm_, decoder_ in zip(x, self.input_proj, self.proj_norm, self.decoder):
            lateral = norm_(proj_(x_))
            q = decoder_(q, lateral.transpose(0, 1))
        q = _off_d3_to_d4(q.transpose(0, 1))
        return self.atm([q])


def _no_dropout(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(mod, nn.MultiheadAttention):
            mod.dropout = 0.0
    return m


def _assert_same_out(a, b):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        return
    assert a.keys() == b.keys()
    for k in ("pred_logits", "pred_masks", "pred"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-10)
    assert len(a["aux_outputs"]) == len(b["aux_outputs"])
    for x, y in zip(a["aux_outputs"], b["aux_outputs"]):
        for k in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(x[k], y[k], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_atm_head_matches_official_transcription(training):
    torch.manual_seed(0)
    K, C, D = 5, 12, 8
    ours = ATMHead(64, C, embed_dims=D, num_layers=2, num_heads=2, use_stages=3, num_classes=K)
    ours.init_weights()
    off = _OffATMHead(64, C, D, 2, 2, 3, K)
    sd = ours.state_dict()
    assert list(sd.keys()) == list(off.state_dict().keys())  # names and order
    off.load_state_dict(sd, strict=True)
    ours, off = _no_dropout(ours).double().train(training), _no_dropout(off).double().train(training)
    # stages: (B, C, h, w) maps, last one smaller (as after a Shrunk backbone) to exercise the resizing
    inputs = [torch.randn(2, C, 4, 4, dtype=torch.float64), torch.randn(2, 16, C, dtype=torch.float64),
              torch.randn(2, C, 2, 2, dtype=torch.float64)]
    out, ref = ours(inputs), off(inputs)
    _assert_same_out(out, ref)
    if training:
        assert out["pred_masks"].shape == (2, K, 64, 64) and out["pred_logits"].shape == (2, K, K + 1)
        assert [a["pred_masks"].shape[-1] for a in out["aux_outputs"]] == [4, 4]
    else:
        assert out.shape == (2, K, 64, 64)


def test_tpn_atm_head_matches_official_transcription():
    torch.manual_seed(1)
    K, C, D = 4, 12, 8
    ours = TPNATMHead(64, C, embed_dims=D, num_layers=2, num_heads=2, use_stages=2, num_classes=K)
    ours.init_weights()
    off = _OffTPNATMHead(64, C, D, 2, 2, 2, K)
    sd = ours.state_dict()
    assert list(sd.keys()) == list(off.state_dict().keys())
    assert "atm.loss_decode.criterion.empty_weight" in sd and "atm.decoder_1.layers.1.multihead_attn.q.weight" in sd
    assert not any(k.startswith("atm.input_proj") for k in sd)  # use_proj=False: Identity
    off.load_state_dict(sd, strict=True)
    ours, off = _no_dropout(ours).double().train(), _no_dropout(off).double().train()
    # Shrunk backbone outputs: tokens at 1/16 (4x4) and 1/32 (2x2)
    inputs = [torch.randn(2, 16, C, dtype=torch.float64), torch.randn(2, 4, C, dtype=torch.float64)]
    out, ref = ours(inputs), off(inputs)
    _assert_same_out(out, ref)
    assert len(out["aux_outputs"]) == 1  # one prediction per ATM decoder layer
    ours.eval(), off.eval()
    _assert_same_out(ours(inputs), off(inputs))


def test_atm_single_head_lateral_fusion_matches_official_transcription():
    torch.manual_seed(2)
    K, C, D = 3, 8, 8
    ours = ATMSingleHead(32, C, embed_dims=D, num_layers=2, num_heads=2, use_stages=2, num_classes=K)
    off = _OffATMHead(32, C, D, 2, 2, 2, K, single=True)
    sd = ours.state_dict()
    assert list(sd.keys()) == list(off.state_dict().keys())
    off.load_state_dict(sd, strict=True)
    ours, off = _no_dropout(ours).double().train(), _no_dropout(off).double().train()
    # stages shallow -> deep: 4x4 and 2x2; the deep lateral is nearest-upsampled onto the shallow one
    inputs = [torch.randn(2, C, 4, 4, dtype=torch.float64), torch.randn(2, C, 2, 2, dtype=torch.float64)]
    out = ours(inputs)
    _assert_same_out(out, off(inputs))
    assert len(out["aux_outputs"]) == 2 * 2 - 1  # every layer of both decoders predicts


def test_official_key_names_and_init():
    torch.manual_seed(0)
    m = segvit_vit_b(num_classes=150, img_size=64, num_layers=2, out_indices=[0, 1], init=True)
    sd = m.state_dict()
    expect = {
        "backbone.patch_embed.projection.weight": (768, 3, 16, 16), "backbone.cls_token": (1, 1, 768),
        "backbone.pos_embed": (1, 17, 768), "backbone.layers.1.ln1.weight": (768,),
        "backbone.layers.1.attn.attn.in_proj_weight": (3 * 768, 768),
        "backbone.layers.1.attn.attn.out_proj.weight": (768, 768),
        "backbone.layers.1.ffn.layers.0.0.weight": (3072, 768), "backbone.layers.1.ffn.layers.1.weight": (768, 3072),
        "decode_head.loss_decode.criterion.empty_weight": (151,),
        "decode_head.input_proj_2.weight": (384, 768), "decode_head.proj_norm_2.weight": (384,),
        "decode_head.decoder_2.layers.2.self_attn.in_proj_weight": (3 * 384, 384),
        "decode_head.decoder_2.layers.2.multihead_attn.q.weight": (384, 384),
        "decode_head.decoder_2.layers.2.multihead_attn.proj.bias": (384,),
        "decode_head.decoder_2.layers.2.linear1.weight": (4 * 384, 384),
        "decode_head.decoder_2.layers.2.norm3.weight": (384,),
        "decode_head.q.weight": (150, 384), "decode_head.class_embed.weight": (151, 384),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("decoder_3" in k for k in sd)  # use_stages = len(out_indices)
    h = m.decode_head
    assert h.decoder_1.layers[0].multihead_attn.num_heads == 12 and isinstance(h.decoder_1.layers[0].multihead_attn,
                                                                              ATMAttention)
    # official init: Linear biases 0, LayerNorm 1/0, trunc-normal(std 0.02, cut at +-2 absolute) weights
    with torch.no_grad():
        assert float(h.class_embed.bias.abs().max()) == 0
        assert 0.018 < float(h.decoder_1.layers[0].linear1.weight.std()) < 0.022
        assert 0.018 < float(h.decoder_1.layers[0].multihead_attn.q.weight.std()) < 0.022
        assert float(h.proj_norm_1.weight.min()) == 1.0
        assert 0.9 < float(h.q.weight.std()) < 1.1  # nn.Embedding's N(0, 1), untouched by init_weights
    assert float(sd["decode_head.loss_decode.criterion.empty_weight"][-1]) == pytest.approx(0.1)


def test_load_checkpoint_with_official_head_keys():
    from fastseg.models import CheckpointMismatchError
    from fastseg.models.segvit import load_segvit_checkpoint

    torch.manual_seed(0)
    m = build_segvit("t", num_classes=3, img_size=32, num_layers=2, embed_dims=16, num_heads=2, head_dims=8,
                     head_heads=2, head_layers=1, out_indices=[0, 1])
    off = _OffATMHead(32, 16, 8, 1, 2, 2, 3)  # the transcribed official head supplies the decode_head keys
    sd = {"module.decode_head." + k: v for k, v in off.state_dict().items()}
    sd.update({"module.backbone." + k: torch.randn_like(v) for k, v in m.backbone.state_dict().items()})
    rep = load_segvit_checkpoint(m, {"meta": {}, "state_dict": sd})
    assert not rep["missing"] and not rep["unexpected"]
    torch.testing.assert_close(m.decode_head.q.weight, off.q.weight)
    sd["module.decode_head.q.weight"] = torch.zeros(5, 8)
    sd["module.decode_head.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as e:
        load_segvit_checkpoint(m, {"state_dict": sd})
    assert e.value.unexpected == ["decode_head.extra"] and e.value.mismatched[0][0] == "decode_head.q.weight"


def _timm_vit_keys(depth):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "head.weight", "head.bias"]
    for i in range(depth):
        for n in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{n}.weight", f"blocks.{i}.{n}.bias"]
    return keys


def _official_convert_vit(keys):
    """The key mapping of zbwxp/SegVit tools/model_converters/vit2mmseg.py (timm -> mmseg)."""
    out = []
    for k in keys:
        if k.startswith("head"):
            continue
        if k.startswith("norm"):
            k = k.replace("norm.", "ln1.")
        elif k.startswith("patch_embed"):
            k = k.replace("proj", "projection") if "proj" in k else k
        elif k.startswith("blocks"):
            if "norm" in k:
                k = k.replace("norm", "ln")
            elif "mlp.fc1" in k:
                k = k.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in k:
                k = k.replace("mlp.fc2", "ffn.layers.1")
            elif "attn.qkv" in k:
                k = k.replace("attn.qkv.", "attn.attn.in_proj_")
            elif "attn.proj" in k:
                k = k.replace("attn.proj", "attn.attn.out_proj")
            k = k.replace("blocks.", "layers.")
        out.append(k)
    return set(out)


def test_vit_keys_match_official_converter_and_timm_forward():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dims=16, num_layers=2, num_heads=2, out_indices=[0, 1],
                            final_norm=True, with_cls_token=True).double().eval()
    vit.init_weights()
    assert set(vit.state_dict()) == _official_convert_vit(_timm_vit_keys(2))
    # timm-style forward with the same weights (qkv split, softmax, proj), pre-norm blocks
    img = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sd = vit.state_dict()
    x = F.conv2d(img, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=8)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(2, -1, -1), x], 1) + sd["pos_embed"]
    outs = []
    for i in range(2):
        p = f"layers.{i}."
        y = F.layer_norm(x, (16,), sd[p + "ln1.weight"], sd[p + "ln1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.attn.in_proj_weight"], sd[p + "attn.attn.in_proj_bias"])
        q, k, v = qkv.reshape(2, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * 8 ** -0.5).softmax(-1) @ v
        a = a.transpose(1, 2).reshape(2, -1, 16)
        x = x + F.linear(a, sd[p + "attn.attn.out_proj.weight"], sd[p + "attn.attn.out_proj.bias"])
        y = F.layer_norm(x, (16,), sd[p + "ln2.weight"], sd[p + "ln2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"])),
                     sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
        x = x + y
        if i == 1:
            x = F.layer_norm(x, (16,), sd["ln1.weight"], sd["ln1.bias"], eps=1e-6)
        outs.append(x[:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2))
    got = vit(img)
    for g, r in zip(got, outs):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
    # another input size: the position embedding is resized (bicubic), the maps follow the grid (corner padding)
    assert [o.shape for o in vit(torch.randn(1, 3, 40, 52, dtype=torch.float64))] == [(1, 16, 5, 7)] * 2


def _focal(x, t):
    p = x.sigmoid()
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    pt = p * t + (1 - p) * (1 - t)
    return ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - pt) ** 2).mean()


def _dice(x, t):
    p = x.sigmoid()
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def test_atm_loss_hand_computed():
    torch.manual_seed(0)
    K = 3
    label = torch.tensor([[[0, 0, 2, 2], [0, 255, 2, 2], [0, 0, 2, 2], [255, 0, 0, 2]],
                          [[255] * 4] * 4])  # image 1: no valid pixel
    logits = torch.randn(2, K, K + 1, dtype=torch.float64)
    masks = torch.randn(2, K, 2, 2, dtype=torch.float64)  # resized bilinearly to 4x4 by the loss
    aux = {"pred_logits": torch.randn(2, K, K + 1, dtype=torch.float64),
           "pred_masks": torch.randn(2, K, 2, 2, dtype=torch.float64)}
    loss = ATMLoss(K, dec_layers=2)({"pred_logits": logits, "pred_masks": masks, "aux_outputs": [aux]}, label, 255)
    assert set(loss) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}

    def expected(lg, mk):
        # fixed assignment: query c <-> class c; image 0 has classes {0, 2}, image 1 none; num_masks = 2
        w = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)
        tgt = [[0, 3, 2], [3, 3, 3]]
        num, den = 0.0, 0.0
        for b in range(2):
            for q in range(K):
                num -= w[tgt[b][q]] * torch.log_softmax(lg[b, q], -1)[tgt[b][q]]
                den += w[tgt[b][q]]
        up = F.interpolate(mk[:1], size=(4, 4), mode="bilinear", align_corners=False)[0]
        focal = sum(_focal(up[c].flatten(), (label[0] == c).double().flatten()) for c in (0, 2)) / 2
        dice = sum(_dice(up[c].flatten(), (label[0] == c).double().flatten()) for c in (0, 2)) / 2
        return num / den, 20 * focal, dice

    for suffix, (lg, mk) in (("", (logits, masks)), ("_0", (aux["pred_logits"], aux["pred_masks"]))):
        ce, fm, dc = expected(lg, mk)
        torch.testing.assert_close(loss["loss_ce" + suffix], ce)
        torch.testing.assert_close(loss["loss_mask" + suffix], fm)
        torch.testing.assert_close(loss["loss_dice" + suffix], dc)
    # loss_weight scales everything
    l2 = ATMLoss(K, dec_layers=2, loss_weight=0.5)({"pred_logits": logits, "pred_masks": masks,
                                                     "aux_outputs": [aux]}, label, 255)
    torch.testing.assert_close(l2["loss_mask_0"], 0.5 * loss["loss_mask_0"])


def test_d3_to_d4_cls_token_drop():
    t = torch.randn(2, 17, 3)  # 4x4 + a leading cls token: odd -> dropped
    torch.testing.assert_close(d3_to_d4(t), t[:, 1:].transpose(1, 2).reshape(2, 3, 4, 4))
    t = torch.randn(2, 9, 3)  # odd square (3x3): kept (the official reshape fails here)
    assert d3_to_d4(t).shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match="square"):
        d3_to_d4(torch.randn(1, 12, 3))


@pytest.mark.parametrize("structure", ["plain", "shrunk", "shrunk++"])
def test_segvit_train_step_grads_and_inference(structure):
    torch.manual_seed(0)
    kw = dict(num_layers=4, embed_dims=32, num_heads=2, head_layers=2)
    if structure == "plain":
        kw["out_indices"] = [1, 2, 3]
    else:
        kw.update(shrink_idx=2, out_indices=[1, 3])
    m = build_segvit("t", num_classes=4, img_size=64, structure=structure, **kw)
    img = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 4, (2, 64, 64))
    label[1, :10] = 255
    losses = m.train()(img, label)
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    zero = [n for n, p in m.named_parameters() if not p.grad.any()]
    assert zero == ["backbone.cls_token"]  # with_cls_token=False: the cls token is dropped before any layer
    if structure == "shrunk++":
        assert "loss_edge" in losses and m.backbone.eqd.edge_head[0].weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        scores = m(img)
        assert scores.shape == (2, 4, 64, 64)
        assert m.predict(img).shape == (2, 64, 64)
        # sliding windows; one window covering the image gives the whole-image scores
        torch.testing.assert_close(m.slide_inference(img, 64, 64), scores)
        assert m.slide_inference(torch.randn(1, 3, 64, 96), 64, 40).shape == (1, 4, 64, 96)
        if structure != "shrunk":  # the TPN-ATM head has (img_size/16)^2 spatial queries: fixed input size
            assert m(torch.randn(1, 3, 48, 48)).shape == (1, 4, 48, 48)


def test_shrink_backbones_shapes():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 64, 64)
    vs = ViTShrink(shrink_idx=2, img_size=64, embed_dims=16, num_layers=4, num_heads=2, out_indices=[1, 2, 3],
                   with_cls_token=False).eval()
    assert [tuple(o.shape) for o in vs(img)] == [(2, 16, 16), (2, 4, 16), (2, 4, 16)]
    # the official vit_shrink forward, transcribed (its ShrinkLayer calls written out on our layer's modules)
    x, hw_shape = vs.patch_embed(img)
    x = torch.cat((vs.cls_token.expand(2, -1, -1), x), dim=1)
    x = vs._pos_embeding(x, hw_shape, vs.pos_embed)[:, 1:]
    ref = []
    for i, layer in enumerate(vs.layers):
        if i == 2:
            n, hw, c = x.shape
            h = w = int(math.sqrt(hw))
            down_x = x.transpose(1, 2).reshape(n, c, h, w)[:, :, ::2, ::2].reshape(n, c, hw // 4).transpose(2, 1)
            x = layer.attn(query=layer.ln1(down_x), key=layer.ln1(x), value=layer.ln1(x), identity=down_x)
            x = layer.ffn(layer.ln2(x), identity=x)
        else:
            x = layer(x)
        if i in (1, 2, 3):
            ref.append(x)
    for a, b in zip(vs(img), ref):
        torch.testing.assert_close(a, b)
    # the shrink layer's queries are the tokens of every second row / column
    x = torch.randn(1, 16, 16)
    from fastseg.models.vit import shrink_tokens
    down, full = shrink_tokens(x)
    torch.testing.assert_close(down, x.reshape(1, 4, 4, 16)[:, ::2, ::2].reshape(1, 4, 16))
    torch.testing.assert_close(full, x)
    sp = ViTShrunkPlus(shrink_idx=2, edge_ratio=0.25, img_size=64, embed_dims=16, num_layers=4, num_heads=2,
                       out_indices=[1, 3]).eval()
    assert [tuple(o.shape) for o in sp(img)] == [(2, 16, 4, 4)] * 2
    q, index, logits = sp.eqd(torch.randn(2, 16, 16), (4, 4))
    assert q.shape == (2, 4 + 4, 16) and logits.shape == (2, 16)
    grid = torch.tensor([0, 2, 8, 10])
    assert (index[:, :4] == grid).all()
    rest = logits.clone()
    rest[:, grid] = float("-inf")
    assert (index[:, 4:].sort(1).values == rest.topk(4, 1).indices.sort(1).values).all()
    with pytest.raises(ValueError, match="out_indices"):
        ViTShrunkPlus(shrink_idx=2, img_size=64, embed_dims=16, num_layers=4, num_heads=2, out_indices=[2])


def test_edge_targets():
    lab = torch.zeros(1, 4, 8, dtype=torch.long)
    lab[:, :, 4:] = 1  # a vertical boundary between columns 3 and 4
    lab[:, 0, 0] = 255  # ignored pixels make no edge
    e = edge_targets(lab, patch_size=2)
    assert e.shape == (1, 2 * 4)
    torch.testing.assert_close(e, torch.tensor([[0.0, 1, 1, 0, 0, 1, 1, 0]]))
