"""CAC (context-aware classifier) reference: hand-computed cases, the official code transcribed, key names,
gradients, ignore index, loss composition. Plain PyTorch on CPU, tiny shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastseg.models import (MSCAN, CACSegmentor, DepthwiseSeparableASPPHeadCAC, FCNHeadCAC, LightHamHeadCAC,
                            UPerHeadCAC)
from fastseg.reference.cac import (cosine_logits, entropy_distill_loss, oracle_class_prototypes, oracle_logits,
                                   refine_logits, soft_class_prototypes)

from helpers import assert_close

D = torch.float64


# ---------------------------------------------------------------------------------------------------------
# The official code (tianzhuotao/CAC mmseg/models/decode_heads/fcn_head_cac.py at 9d4a17d), transcribed with
# only `.cuda()` removed, and mmseg 0.19's BaseDecodeHead.losses (CrossEntropyLoss mean over all pixels,
# accuracy). Used as the oracle the fastseg head is compared with.
# ---------------------------------------------------------------------------------------------------------
def _off_get_pred(x, proto):
    b, c, h, w = x.size()[:]
    if len(proto.shape[:]) == 3:
        cls_num = proto.size(1)
        x = x / (torch.norm(x, 2, 1, True) + 1e-12)
        proto = proto / (torch.norm(proto, 2, -1, True) + 1e-12)
        x = x.contiguous().view(b, c, h * w)
        pred = proto @ x
    elif len(proto.shape[:]) == 2:
        cls_num = proto.size(0)
        x = x / (torch.norm(x, 2, 1, True) + 1e-12)
        proto = proto / (torch.norm(proto, 2, 1, True) + 1e-12)
        x = x.contiguous().view(b, c, h * w)
        proto = proto.unsqueeze(0)
        pred = proto @ x
    pred = pred.contiguous().view(b, cls_num, h, w)
    return pred * 15


def _off_get_adaptive_perspective(head, x, y, new_proto, proto):
    raw_x = x.clone()
    b, c, h, w = x.shape[:]
    y = F.interpolate(y.float(), size=(h, w), mode='nearest')
    unique_y = list(y.unique())
    if 255 in unique_y:
        unique_y.remove(255)
    for tmp_y in unique_y:
        tmp_mask = (y == tmp_y).float()
        tmp_proto = (x * tmp_mask).sum(0).sum(-1).sum(-1) / (tmp_mask.sum(0).sum(-1).sum(-1) + 1e-12)
        onehot_vec = torch.zeros(new_proto.shape[0], 1)
        onehot_vec[tmp_y.long()] = 1
        new_proto = new_proto * (1 - onehot_vec) + tmp_proto.unsqueeze(0) * onehot_vec
    new_proto = torch.cat([new_proto, proto], -1)
    new_proto = head.apd_proj(new_proto)
    new_proto = new_proto.unsqueeze(-1).unsqueeze(-1)
    new_proto = F.normalize(new_proto, 2, 1)
    raw_x = F.normalize(raw_x, 2, 1)
    return F.conv2d(raw_x, weight=new_proto) * 15


def _off_get_pred_aspp(x, proto):
    """sep_aspp_head_cac.py / ocr_head_cac.py's get_pred (3-D case): the bare norms, no + 1e-12."""
    b, c, h, w = x.size()[:]
    cls_num = proto.size(1)
    x = x / torch.norm(x, 2, 1, True)
    proto = proto / torch.norm(proto, 2, -1, True)
    x = x.contiguous().view(b, c, h * w)
    pred = proto @ x
    pred = pred.contiguous().view(b, cls_num, h, w)
    return pred * 15


def _off_post_refine_proto_v2(head, x, pred, proto):
    raw_x = x.clone()
    b, c, h, w = raw_x.shape[:]
    pred = pred.view(b, proto.shape[0], h * w)
    pred = F.softmax(pred, 1)
    pred_proto = (pred @ raw_x.view(b, c, h * w).permute(0, 2, 1)) / (pred.sum(-1).unsqueeze(-1) + 1e-12)
    pred_proto = torch.cat([pred_proto, proto.unsqueeze(0).repeat(pred_proto.shape[0], 1, 1)], -1)
    pred_proto = head.proj(pred_proto)
    get_pred = _off_get_pred_aspp if isinstance(head, DepthwiseSeparableASPPHeadCAC) else _off_get_pred
    return get_pred(raw_x, pred_proto)


def _off_get_distill_loss(pred, soft, target, smoothness=0.5, eps=0):
    b, c, h, w = soft.shape[:]
    soft.detach()
    target = F.interpolate(target.unsqueeze(1).float(), size=pred.shape[-2:], mode='nearest').squeeze(1).long()
    onehot = target.view(-1, 1)
    ignore_mask = (onehot == 255).float()
    onehot = onehot * (1 - ignore_mask)
    onehot = torch.zeros(b * h * w, c).scatter_(1, onehot.long(), 1)
    onehot = onehot.contiguous().view(b, h, w, c).permute(0, 3, 1, 2)
    sm_soft = F.softmax(soft / 1, 1)
    smoothed_label = smoothness * sm_soft + (1 - smoothness) * onehot
    if eps > 0:
        smoothed_label = smoothed_label * (1 - eps) + (1 - smoothed_label) * eps / (smoothed_label.shape[1] - 1)
    loss = torch.mul(-1 * F.log_softmax(pred, dim=1), smoothed_label)
    sm_soft = F.softmax(soft / 1, 1)
    entropy_mask = -1 * (sm_soft * torch.log(sm_soft + 1e-12)).sum(1)
    loss = loss.sum(1)
    unique_classes = list(target.unique())
    if 255 in unique_classes:
        unique_classes.remove(255)
    valid_mask = (target != 255).float()
    entropy_mask = entropy_mask * valid_mask
    loss_list, weight_list = [], []
    for tmp_y in unique_classes:
        tmp_mask = (target == tmp_y).float()
        tmp_entropy_mask = entropy_mask * tmp_mask
        class_weight = 1
        tmp_loss = (loss * tmp_entropy_mask).sum() / (tmp_entropy_mask.sum() + 1e-12)
        loss_list.append(class_weight * tmp_loss)
        weight_list.append(class_weight)
    if len(weight_list) > 0:
        loss = sum(loss_list) / (sum(weight_list) + 1e-12)
    else:
        loss = torch.zeros(1).mean()
    return loss


def _off_losses(seg_logit, seg_label, align_corners=False, ignore_index=255, loss_weight=1.0):
    seg_logit = F.interpolate(seg_logit, size=seg_label.shape[2:], mode='bilinear', align_corners=align_corners)
    seg_label = seg_label.squeeze(1)
    loss = F.cross_entropy(seg_logit, seg_label, reduction='none', ignore_index=ignore_index).mean() * loss_weight
    acc = seg_logit.topk(1, dim=1)[1].transpose(0, 1).eq(seg_label.unsqueeze(0))
    acc = acc.reshape(-1).float().sum(0, keepdim=True)
    return {'loss_ce': loss, 'acc_seg': acc.mul_(100.0 / seg_label.numel())}


def _off_forward_train(head, inputs, y):
    criterion = torch.nn.CrossEntropyLoss(ignore_index=255)
    x, feat = head.base_forward(inputs)
    pre_self_x = x.clone()
    x = _off_post_refine_proto_v2(head, feat, x, head.conv_seg.weight.squeeze())
    apd_pred = _off_get_adaptive_perspective(head, feat, y, head.conv_seg.weight.detach().data.squeeze(),
                                             head.conv_seg.weight.squeeze())
    kl_loss = _off_get_distill_loss(pred=x, soft=apd_pred.detach(), target=y.squeeze(1))
    pre_self_x = F.interpolate(pre_self_x, size=y.shape[-2:], mode='bilinear', align_corners=True)
    pre_self_loss = criterion(pre_self_x, y.squeeze(1).long())
    apd_pred = F.interpolate(apd_pred, size=y.shape[-2:], mode='bilinear', align_corners=True)
    pre_loss = criterion(apd_pred, y.squeeze(1).long())
    losses = _off_losses(x, y, head.align_corners, loss_weight=head.loss_weight)
    losses['PreSelfLoss'] = pre_self_loss.detach().data
    losses['PreLoss'] = pre_loss.detach().data
    losses['KLLoss'] = kl_loss.detach().data
    losses['MainLoss'] = losses['loss_ce'].detach().data
    losses['loss_ce'] = losses['loss_ce'] + pre_self_loss + pre_loss + kl_loss
    return losses


# FCNHeadCAC's state_dict keys as the official head (mmcv ConvModule: conv without bias + `bn` + `activate`;
# BaseDecodeHead's conv_seg; the CAC projectors), written from reading fcn_head_cac.py.
OFFICIAL_FCN_CAC_KEYS = [
    "conv_seg.weight", "conv_seg.bias",
    *[f"{m}.{p}" for m in ("convs.0", "convs.1", "conv_cat")
      for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")],
    "proj.0.weight", "proj.2.weight", "proj.2.bias",
    "apd_proj.0.weight", "apd_proj.2.weight", "apd_proj.2.bias",
]


def _cm_shapes(name, cout, cin, ks, groups=1):
    """Parameter shapes of an mmcv ConvModule (conv without bias + BatchNorm) named ``name``."""
    return {f"{name}.conv.weight": (cout, cin // groups, ks, ks), f"{name}.bn.weight": (cout,),
            f"{name}.bn.bias": (cout,), f"{name}.bn.running_mean": (cout,), f"{name}.bn.running_var": (cout,),
            f"{name}.bn.num_batches_tracked": ()}


def _proj_shapes(ch):
    """Parameter shapes of the CAC head's two projectors, ``proj`` and ``apd_proj``."""
    shapes = {}
    for name in ("proj", "apd_proj"):
        shapes.update({f"{name}.0.weight": (ch // 2, 2 * ch), f"{name}.2.weight": (ch, ch // 2),
                       f"{name}.2.bias": (ch,)})
    return shapes


def _official_shapes(cin, ch, k):
    """Parameter shapes of the official FCNHeadCAC(in_channels=cin, channels=ch, num_classes=k, 2 convs, 3x3)."""
    shapes = {"conv_seg.weight": (k, ch, 1, 1), "conv_seg.bias": (k,)}
    for name, c_in in (("convs.0", cin), ("convs.1", ch), ("conv_cat", cin + ch)):
        shapes.update(_cm_shapes(name, ch, c_in, 3))
    shapes.update(_proj_shapes(ch))
    return shapes


def _head(cin=6, ch=8, k=5, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    head = FCNHeadCAC(in_channels=cin, channels=ch, num_classes=k, dropout_ratio=dropout).to(D)
    with torch.no_grad():  # a classifier of a trained scale (normal(0, 0.01) makes every logit ~0)
        head.conv_seg.weight.normal_(0, 0.5)
        head.conv_seg.bias.normal_(0, 0.5)
    return head


def _labels(b, h, w, k, seed=1, ignore_frac=0.2, absent=None):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (b, 1, h, w), generator=g)
    if absent is not None:
        y[y == absent] = (absent + 1) % k
    y[torch.rand((b, 1, h, w), generator=g) < ignore_frac] = 255
    return y


# ---------------------------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def test_soft_prototypes_by_hand():
    # 2x2 image, 2 classes. Features f = (2,0) (0,2) / (1,1) (3,1); class-0 probabilities .75 .25 / .5 .5
    feat = torch.tensor([[[2., 0.], [1., 3.]], [[0., 2.], [1., 1.]]], dtype=D).unsqueeze(0)  # 1, 2, 2, 2
    l3 = math.log(3.0)
    logits = torch.tensor([[[l3, 0.], [0., 0.]], [[0., l3], [0., 0.]]], dtype=D).unsqueeze(0)
    proto = soft_class_prototypes(feat, logits)
    # class 0: (.75(2,0) + .25(0,2) + .5(1,1) + .5(3,1)) / 2 = (3.5, 1.5) / 2
    # class 1: (.25(2,0) + .75(0,2) + .5(1,1) + .5(3,1)) / 2 = (2.5, 2.5) / 2
    expected = torch.tensor([[[1.75, 0.75], [1.25, 1.25]]], dtype=D)
    assert torch.allclose(proto, expected, atol=1e-12), proto


def test_cosine_logits_by_hand_and_bounded():
    feat = torch.tensor([3., 4.], dtype=D).view(1, 2, 1, 1)
    proto = torch.tensor([[1., 0.], [0., -2.], [4., 3.]], dtype=D)
    out = cosine_logits(feat, proto)
    # cos = 3/5, -4/5, 24/25, times tau = 15
    assert torch.allclose(out.flatten(), torch.tensor([9.0, -12.0, 14.4], dtype=D), atol=1e-10)
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 7, 3, 5, generator=g, dtype=D) * 100
    per_image = torch.randn(2, 4, 7, generator=g, dtype=D)
    out = cosine_logits(feat, per_image)
    assert out.shape == (2, 4, 3, 5) and out.abs().max() <= 15.0 * (1 + 1e-12)
    # scale-invariant in both arguments; a class parallel to a pixel's feature scores exactly tau
    assert_close(cosine_logits(feat * 0.01, per_image * 7), out, 1e-12)
    aligned = feat[:, :, 1, 2].unsqueeze(1)  # (B, 1, C): each image's pixel (1, 2)
    assert torch.allclose(cosine_logits(feat, aligned)[:, 0, 1, 2], torch.full((2,), 15.0, dtype=D))


def test_oracle_prototypes_by_hand_pool_over_batch_and_ignore():
    # two 1x2 images, labels at 2x the feature size (nearest picks rows/cols 0 of each 2x2 block)
    feat = torch.tensor([[[[2., 4.]], [[0., 1.]]], [[[6., 8.]], [[3., 5.]]]], dtype=D)  # (2, 2, 1, 2)
    y = torch.full((2, 1, 2, 4), 7)  # the odd rows/cols are dropped by the resize: 7 never seen
    y[0, 0, 0, 0], y[0, 0, 0, 2] = 0, 255  # image 0: pixel (0,0) class 0, pixel (0,1) ignored
    y[1, 0, 0, 0], y[1, 0, 0, 2] = 0, 1  # image 1: class 0, class 1
    weight = torch.arange(12, dtype=D).view(3, 4)[:, :2] * -1.0  # (K=3, C=2); class 2 absent
    table = oracle_class_prototypes(feat, y, weight)
    # class 0: mean over the batch of (2,0) and (6,3); class 1: (8,5); class 2 keeps its weight row
    expected = torch.tensor([[4.0, 1.5], [8.0, 5.0], weight[2].tolist()], dtype=D)
    assert torch.allclose(table, expected, atol=1e-12), table
    # features at ignored pixels do not matter
    feat2 = feat.clone()
    feat2[0, :, 0, 1] = 1e3
    assert torch.equal(oracle_class_prototypes(feat2, y, weight), table)


def test_distill_loss_by_hand_per_class_average():
    # uniform teacher: entropy log 2 everywhere (equal weights), soft target .25/.25 + .5 onehot
    pred = torch.tensor([[[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]], dtype=D)  # (1, 2, 2, 2)
    teacher = torch.zeros_like(pred)
    y = torch.tensor([[[0, 0], [0, 1]]])
    lsm = F.log_softmax(pred, 1)
    pix = -(0.25 * lsm.sum(1) + 0.5 * lsm.gather(1, y.unsqueeze(1)).squeeze(1))[0]  # (2, 2)
    # class 0 has three pixels, class 1 one: the loss is the mean of the two class means (not the pixel mean)
    expected = (pix[0, 0] + pix[0, 1] + pix[1, 0]) / 3 / 2 + pix[1, 1] / 2
    got = entropy_distill_loss(pred, teacher, y)
    assert abs(got.item() - expected.item()) < 1e-10
    assert abs(got.item() - pix.mean().item()) > 1e-3  # the per-class average differs from the pixel mean
    # explicit numbers: softmax(0,0), (1,0), (2,0) and (0,3)
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    p00 = -(0.25 * (-2 * math.log(2)) + 0.5 * (-math.log(2)))
    p01 = -(0.25 * (1 - 2 * lse(1, 0)) + 0.5 * (1 - lse(1, 0)))
    p10 = -(0.25 * (2 - 2 * lse(2, 0)) + 0.5 * (2 - lse(2, 0)))
    p11 = -(0.25 * (3 - 2 * lse(0, 3)) + 0.5 * (3 - lse(0, 3)))
    assert abs(got.item() - ((p00 + p01 + p10) / 3 + p11) / 2) < 1e-10
    # an ignored pixel leaves the loss of the others; all ignored gives 0
    y_ign = y.clone()
    y_ign[0, 1, 1] = 255
    assert abs(entropy_distill_loss(pred, teacher, y_ign).item() - (p00 + p01 + p10) / 3) < 1e-10
    assert entropy_distill_loss(pred, teacher, torch.full_like(y, 255)).item() == 0.0


def test_distill_loss_entropy_weights():
    # a confident teacher pixel (low entropy) weighs less than an uncertain one
    pred = torch.zeros(1, 2, 1, 2, dtype=D)
    pred[0, 0, 0, 0] = 2.0
    teacher = torch.tensor([[[[0.0, 5.0]], [[0.0, 0.0]]]], dtype=D)  # pixel 0 uniform, pixel 1 confident
    y = torch.zeros(1, 1, 2, dtype=torch.long)
    soft = teacher.softmax(1)
    ent = -(soft * torch.log(soft + 1e-12)).sum(1)[0, 0]
    lp = F.log_softmax(pred, 1)[0, :, 0]  # (2, 2): class x pixel
    tgt = 0.5 * soft[0, :, 0] + 0.5 * torch.tensor([[1.0], [0.0]], dtype=D)
    pix = -(lp * tgt).sum(0)
    expected = (pix * ent).sum() / (ent.sum() + 1e-12)
    assert abs(entropy_distill_loss(pred, teacher, y).item() - expected.item()) < 1e-12
    assert ent[1] < 0.5 * ent[0]


# ---------------------------------------------------------------------------------------------------------
# against the official code
# ---------------------------------------------------------------------------------------------------------
def test_blocks_match_official():
    head = _head()
    g = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 8, 5, 7, generator=g, dtype=D)
    base = torch.randn(2, 5, 5, 7, generator=g, dtype=D)
    w = head.conv_seg.weight.squeeze()
    assert_close(refine_logits(feat, base, head.classifier_weight, head.proj),
                 _off_post_refine_proto_v2(head, feat, base, w), 1e-12, "post_refine_proto_v2")
    assert_close(cosine_logits(feat, w), _off_get_pred(feat, w), 1e-12, "get_pred (K, C)")
    y = _labels(2, 10, 14, 5, absent=3)
    assert_close(oracle_logits(feat, y, head.classifier_weight, head.apd_proj),
                 _off_get_adaptive_perspective(head, feat, y, w.detach(), w), 1e-12, "get_adaptive_perspective")
    teacher = torch.randn(2, 5, 5, 7, generator=g, dtype=D)
    for eps in (0.0, 0.1):
        ours = entropy_distill_loss(base, teacher, y.squeeze(1), eps=eps)
        ref = _off_get_distill_loss(base, teacher, y.squeeze(1), eps=eps)
        assert abs(ours.item() - ref.item()) < 1e-12 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("loss_weight", [1.0, 0.4])
def test_forward_train_matches_official(loss_weight):
    head = _head()
    head.loss_weight = loss_weight
    head.train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 5, 6, generator=g, dtype=D)
    y = _labels(2, 20, 24, 5, absent=2)  # image 4x the feature size, class 2 absent, ~20% ignored
    torch.manual_seed(7)
    ours = head.forward_train([x], y)
    ours_grads = torch.autograd.grad(ours["loss_ce"], list(head.parameters()))
    torch.manual_seed(7)
    ref = _off_forward_train(head, [x], y)
    ref_grads = torch.autograd.grad(ref["loss_ce"], list(head.parameters()))
    assert set(ours) == set(ref) == {"loss_ce", "acc_seg", "PreSelfLoss", "PreLoss", "KLLoss", "MainLoss"}
    for k in ref:
        assert abs(ours[k].item() - ref[k].item()) < 1e-10 * max(1.0, abs(ref[k].item())), (k, ours[k], ref[k])
    for (name, _), a, b in zip(head.named_parameters(), ours_grads, ref_grads):
        assert_close(a, b, 1e-10, name)
    # the total is the official sum: weighted main CE + pre-self CE + oracle CE + distillation, weights 1
    total = ours["MainLoss"] + ours["PreSelfLoss"] + ours["PreLoss"] + ours["KLLoss"]
    assert abs(ours["loss_ce"].item() - total.item()) < 1e-12
    assert all(ours[k].item() > 0 for k in ("MainLoss", "PreSelfLoss", "PreLoss", "KLLoss"))


def test_eval_forward_matches_official_forward_test():
    head = _head().eval()
    x = torch.randn(3, 6, 4, 5, dtype=D)
    out = head([torch.randn(3, 2, 8, 10, dtype=D), x])  # picks in_index=-1
    base, feat = head.base_forward(x)
    assert out.shape == (3, 5, 4, 5)
    assert_close(out, _off_post_refine_proto_v2(head, feat, base, head.conv_seg.weight.squeeze()), 1e-12)
    assert out.abs().max() <= 15.0 * (1 + 1e-12)


def test_fcn_base_forward_by_functional_ops():
    torch.manual_seed(0)
    head = FCNHeadCAC(in_channels=3, channels=4, num_classes=2, dilation=2).to(D).eval()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    x = torch.randn(1, 3, 7, 6, dtype=D)
    sd = head.state_dict()

    def cbr(t, name, pad, dil):
        t = F.conv2d(t, sd[f"{name}.conv.weight"], padding=pad, dilation=dil)
        t = F.batch_norm(t, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                         sd[f"{name}.bn.bias"], eps=1e-5)
        return t.relu()

    out = cbr(cbr(x, "convs.0", 2, 2), "convs.1", 2, 2)
    out = cbr(torch.cat([x, out], 1), "conv_cat", 1, 1)  # conv_cat: padding k//2, no dilation
    base, feat = head.base_forward(x)
    assert_close(feat, out, 1e-12, "feat")
    assert_close(base, F.conv2d(out, sd["conv_seg.weight"], sd["conv_seg.bias"]), 1e-12, "base logits")


def test_dropout_only_on_the_base_classifier():
    """As the original: ``conv_seg(dropout(feat))`` for the base logits, the features themselves undropped."""
    head = _head(dropout=0.5).train()
    x = torch.randn(2, 6, 4, 4, dtype=D)
    torch.manual_seed(5)
    base, feat = head.base_forward(x)
    torch.manual_seed(5)
    feat_again = head.convs(x)
    feat_again = head.conv_cat(torch.cat([x, feat_again], 1))
    expected = head.conv_seg(F.dropout2d(feat_again, 0.5, training=True))
    assert_close(feat, feat_again, 1e-12, "feat")
    assert_close(base, expected, 1e-12, "base logits")
    assert (feat.abs().sum((2, 3)) > 0).all()  # no channel of the features is dropped


# ---------------------------------------------------------------------------------------------------------
# parameters, gradients, ignore index, errors
# ---------------------------------------------------------------------------------------------------------
def test_official_state_dict_loads_strictly():
    head = FCNHeadCAC(in_channels=6, channels=8, num_classes=5)
    assert sorted(head.state_dict()) == sorted(OFFICIAL_FCN_CAC_KEYS)
    g = torch.Generator().manual_seed(0)
    official = {k: (torch.tensor(3) if not s else torch.randn(s, generator=g))
                for k, s in _official_shapes(6, 8, 5).items()}
    head.load_state_dict(official, strict=True)
    assert torch.equal(head.proj[2].weight, official["proj.2.weight"])
    # the released ADE20K FCN + CAC head (MobileNetV2: in 320, channels 512, 150 classes), on the meta device
    with torch.device("meta"):
        ade = FCNHeadCAC()
    assert {k: tuple(v.shape) for k, v in ade.state_dict().items()} == _official_shapes(320, 512, 150)


def test_gradients_reach_every_parameter():
    head = _head(dropout=0.0)
    x = torch.randn(2, 6, 4, 4, dtype=D, requires_grad=True)
    y = _labels(2, 8, 8, 5)
    head.forward_train([x], y)["loss_ce"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_each_term_reaches_its_parameters():
    """apd_proj learns only from the oracle CE (the distillation sees a detached teacher); proj from the main
    CE and the distillation, not from the base CE."""
    head = _head(dropout=0.0)
    x = torch.randn(2, 6, 4, 4, dtype=D)
    y = _labels(2, 8, 8, 5)
    base, feat = head.base_forward(x)
    refined = refine_logits(feat, base, head.classifier_weight, head.proj)
    oracle = oracle_logits(feat, y, head.classifier_weight, head.apd_proj)
    kl = entropy_distill_loss(refined, oracle, y)
    g_apd = torch.autograd.grad(kl, list(head.apd_proj.parameters()), allow_unused=True)
    assert all(g is None for g in g_apd)
    g_apd = torch.autograd.grad(F.cross_entropy(oracle, F.interpolate(y.float(), size=(4, 4)).long()[:, 0],
                                                ignore_index=255), list(head.apd_proj.parameters()))
    assert all(g.abs().sum() > 0 for g in g_apd)
    g_proj = torch.autograd.grad(kl, list(head.proj.parameters()))
    assert all(g.abs().sum() > 0 for g in g_proj)


def test_ignore_index():
    head = _head(dropout=0.0)
    x = torch.randn(2, 6, 4, 4, dtype=D)
    y = _labels(2, 4, 4, 5, ignore_frac=0.3)
    valid = y != 255
    losses = head.forward_train([x], y)
    base, feat = head.base_forward(x)
    refined = head(x)
    lab = y[:, 0]
    # main CE: mmseg's mean over all pixels (ignored count 0); the extra CEs: mean over labelled pixels
    ce = F.cross_entropy(refined, torch.where(valid[:, 0], lab, 0), reduction="none")[valid[:, 0]]
    assert abs(losses["MainLoss"].item() - ce.sum().item() / lab.numel()) < 1e-12
    ce_base = F.cross_entropy(base, torch.where(valid[:, 0], lab, 0), reduction="none")[valid[:, 0]]
    assert abs(losses["PreSelfLoss"].item() - ce_base.mean().item()) < 1e-12
    # one ignore_index serves every term: another value marking the same pixels gives the same losses
    head.ignore_index = 100
    same = head.forward_train([x], torch.where(valid, y, 100))
    assert all(abs(same[k].item() - v.item()) < 1e-12 for k, v in losses.items())
    head.ignore_index = 255
    # features at ignored pixels do not enter the oracle prototypes (the oracle logits elsewhere stay)
    one = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    one[0, 0, 1, 1] = 255
    f = torch.randn(1, 8, 2, 2, dtype=D)
    o1 = oracle_logits(f, one, head.classifier_weight, head.apd_proj)
    f[0, :, 1, 1] = 5.0
    o2 = oracle_logits(f, one, head.classifier_weight, head.apd_proj)
    assert_close(o2[..., 0, :], o1[..., 0, :], 1e-12)


def test_bad_input_errors():
    head = _head()
    x = torch.randn(1, 6, 4, 4, dtype=D)
    with pytest.raises(ValueError, match="labels must be in"):
        head.forward_train([x], torch.full((1, 1, 4, 4), 5))
    with pytest.raises(ValueError, match="integer"):
        head.forward_train([x], torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="proto"):
        cosine_logits(x, torch.zeros(3, 5, dtype=D))
    with pytest.raises(ValueError, match="num_convs=0"):
        FCNHeadCAC(in_channels=6, channels=8, num_classes=5, num_convs=0)


def test_segnext_cac_segmentor_tiny():
    torch.manual_seed(0)
    backbone = MSCAN(embed_dims=[8, 8, 16, 16], mlp_ratios=[2, 2, 2, 2], depths=[1, 1, 1, 1])
    head = LightHamHeadCAC(in_channels=[8, 16, 16], channels=32, ham_channels=32, num_classes=4,
                           ham_kwargs=dict(MD_S=1, MD_R=4, train_steps=2, eval_steps=2, inv_t=100, rand_init=True))
    model = CACSegmentor(backbone, head)
    img = torch.randn(2, 3, 32, 32)
    y = _labels(2, 32, 32, 4)
    losses = model.forward_train(img, y)
    assert abs(losses["loss"].item() - losses["decode.loss_ce"].item()) < 1e-6  # the other keys are logs
    losses["loss"].backward()
    assert head.apd_proj[0].weight.grad.abs().sum() > 0 and backbone.norm4.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(img)
    assert out.shape == (2, 4, 32, 32) and torch.isfinite(out).all() and out.abs().max() <= 15.0 * (1 + 1e-5)


def test_bench_op_eager_runs_the_head_loss():
    from fastseg.bench.registry import get_op

    spec = get_op("cac")
    s = spec.full_shape({"B": 1, "C": 8, "K": 5, "H": 4, "W": 4, "stride": 2})
    for mode in ("fwd", "fwdbwd"):
        prepared = spec.impl("eager").prepare(s, torch.float32, torch.device("cpu"), mode)
        out = prepared.forward()
        assert out.shape == ((1, 5, 4, 4) if mode == "fwd" else ())
        assert torch.isfinite(out).all()
        prepared.run()


# ---------------------------------------------------------------------------------------------------------
# UPerHeadCAC (uper_head_cac.py)
# ---------------------------------------------------------------------------------------------------------
def _off_uper_forward(head, inputs):
    """The official UPerHeadCAC.forward / psp_forward / PPM.forward, transcribed (mmseg resize = interpolate)."""
    ac = head.align_corners
    inputs = [inputs[i] for i in head.in_index]
    laterals = [lateral_conv(inputs[i]) for i, lateral_conv in enumerate(head.lateral_convs)]
    x = inputs[-1]
    psp_outs = [x]
    psp_outs.extend([F.interpolate(ppm(x), size=x.size()[2:], mode='bilinear', align_corners=ac)
                     for ppm in head.psp_modules])
    laterals.append(head.bottleneck(torch.cat(psp_outs, dim=1)))
    used_backbone_levels = len(laterals)
    for i in range(used_backbone_levels - 1, 0, -1):
        prev_shape = laterals[i - 1].shape[2:]
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=prev_shape, mode='bilinear',
                                                          align_corners=ac)
    fpn_outs = [head.fpn_convs[i](laterals[i]) for i in range(used_backbone_levels - 1)]
    fpn_outs.append(laterals[-1])
    for i in range(used_backbone_levels - 1, 0, -1):
        fpn_outs[i] = F.interpolate(fpn_outs[i], size=fpn_outs[0].shape[2:], mode='bilinear', align_corners=ac)
    fpn_outs = torch.cat(fpn_outs, dim=1)
    feat = head.fpn_bottleneck(fpn_outs)
    out = head.conv_seg(head.dropout(feat))
    return out, feat


def _official_uper_shapes(cins, ch, k, scales=4):
    cm = _cm_shapes
    shapes = {"conv_seg.weight": (k, ch, 1, 1), "conv_seg.bias": (k,)}
    for i in range(scales):
        shapes.update(cm(f"psp_modules.{i}.1", ch, cins[-1], 1))
    shapes.update(cm("bottleneck", ch, cins[-1] + scales * ch, 3))
    for i, c in enumerate(cins[:-1]):
        shapes.update(cm(f"lateral_convs.{i}", ch, c, 1))
    for i in range(len(cins) - 1):
        shapes.update(cm(f"fpn_convs.{i}", ch, ch, 3))
    shapes.update(cm("fpn_bottleneck", ch, len(cins) * ch, 3))
    shapes.update(_proj_shapes(ch))
    return shapes


def _uper(seed=0):
    torch.manual_seed(seed)
    head = UPerHeadCAC(in_channels=[3, 4, 5, 6], channels=8, num_classes=5, pool_scales=(1, 2, 3)).to(D)
    with torch.no_grad():
        head.conv_seg.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    feats = [torch.randn(2, c, 12 // 2**i, 10 // 2**i + 1, generator=g, dtype=D) for i, c in enumerate([3, 4, 5, 6])]
    return head, feats


def test_uper_official_keys_and_forward():
    head, feats = _uper()
    g = torch.Generator().manual_seed(0)
    official = {k: (torch.tensor(3) if not s else torch.randn(s, generator=g))
                for k, s in _official_uper_shapes([3, 4, 5, 6], 8, 5, scales=3).items()}
    head.load_state_dict({k: v.to(D) for k, v in official.items()}, strict=True)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.abs_().add_(0.5)
    head.eval()
    base, feat = head.base_forward(feats)
    ref_base, ref_feat = _off_uper_forward(head, feats)
    assert_close(feat, ref_feat, 1e-12, "feat")
    assert_close(base, ref_base, 1e-12, "base")
    out = head(feats)
    assert out.shape == (2, 5, 12, 11)
    assert_close(out, _off_post_refine_proto_v2(head, feat, base, head.conv_seg.weight.squeeze()), 1e-12)
    # the released Swin-T UPerNet + CAC head (in [96, 192, 384, 768], channels 512, 150 classes)
    with torch.device("meta"):
        swin_t = UPerHeadCAC()
    assert {k: tuple(v.shape) for k, v in swin_t.state_dict().items()} == _official_uper_shapes(
        [96, 192, 384, 768], 512, 150)


def _check_forward_train_matches_official(head, feats, y):
    """Training-mode losses equal the official forward_train's (same dropout draws), and the CE's gradient
    reaches every parameter."""
    head.train()
    torch.manual_seed(3)
    ours = head.forward_train(feats, y)
    torch.manual_seed(3)
    ref = _off_forward_train(head, feats, y)
    for k in ref:
        assert abs(ours[k].item() - ref[k].item()) < 1e-10 * max(1.0, abs(ref[k].item())), (k, ours[k], ref[k])
    ours["loss_ce"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_uper_forward_train_matches_official_and_reaches_every_parameter():
    head, feats = _uper()
    _check_forward_train_matches_official(head, feats, _labels(2, 48, 44, 5, absent=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_in_float32(dtype):
    """A class covering more pixels than fp16 can count (65 505): the oracle's mean and the distillation stay
    finite and close to float32."""
    g = torch.Generator().manual_seed(0)
    feat = torch.rand(1, 4, 260, 260, generator=g) + 0.5  # 67 600 pixels, one class
    y = torch.zeros(1, 1, 260, 260, dtype=torch.long)
    weight = torch.randn(2, 4, generator=g)
    ref = oracle_class_prototypes(feat, y, weight)
    got = oracle_class_prototypes(feat.to(dtype), y, weight.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close(got.float(), ref, 1e-2, "oracle table")
    pred = torch.randn(1, 2, 260, 260, generator=g)
    teacher = torch.randn(1, 2, 260, 260, generator=g)
    ref = entropy_distill_loss(pred, teacher, y)
    got = entropy_distill_loss(pred.to(dtype), teacher.to(dtype), y)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) < 2e-2 * ref.item()


# ---------------------------------------------------------------------------------------------------------
# DepthwiseSeparableASPPHeadCAC (sep_aspp_head_cac.py, DeepLabV3+)
# ---------------------------------------------------------------------------------------------------------
def _off_aspp_forward(head, inputs):
    """The official DepthwiseSeparableASPPHeadCAC.forward (with ASPPModule.forward), transcribed."""
    ac = head.align_corners
    x = inputs[head.in_index]
    aspp_outs = [F.interpolate(head.image_pool(x), size=x.size()[2:], mode='bilinear', align_corners=ac)]
    aspp_outs.extend([m(x) for m in head.aspp_modules])
    output = head.bottleneck(torch.cat(aspp_outs, dim=1))
    if head.c1_bottleneck is not None:
        c1_output = head.c1_bottleneck(inputs[0])
        output = F.interpolate(output, size=c1_output.shape[2:], mode='bilinear', align_corners=ac)
        output = torch.cat([output, c1_output], dim=1)
    feat = head.sep_bottleneck(output)
    return head.conv_seg(head.dropout(feat)), feat


def _official_aspp_shapes(cin, ch, k, dilations, c1_in, c1):
    cm = _cm_shapes

    def sep(name, cout, cin_):
        return {**cm(f"{name}.depthwise_conv", cin_, cin_, 3, groups=cin_),
                **cm(f"{name}.pointwise_conv", cout, cin_, 1)}

    shapes = {"conv_seg.weight": (k, ch, 1, 1), "conv_seg.bias": (k,), **cm("image_pool.1", ch, cin, 1)}
    for i, d in enumerate(dilations):
        shapes.update(cm(f"aspp_modules.{i}", ch, cin, 1) if d == 1 else sep(f"aspp_modules.{i}", ch, cin))
    shapes.update(cm("bottleneck", ch, (len(dilations) + 1) * ch, 3))
    shapes.update(cm("c1_bottleneck", c1, c1_in, 1))
    shapes.update(sep("sep_bottleneck.0", ch, ch + c1))
    shapes.update(sep("sep_bottleneck.1", ch, ch))
    shapes.update(_proj_shapes(ch))
    return shapes


def _aspp(seed=0):
    torch.manual_seed(seed)
    head = DepthwiseSeparableASPPHeadCAC(in_channels=6, channels=8, num_classes=5, dilations=(1, 2, 3),
                                         c1_in_channels=3, c1_channels=4, in_index=1).to(D)
    with torch.no_grad():
        head.conv_seg.weight.normal_(0, 0.5)
    g = torch.Generator().manual_seed(seed + 1)
    feats = [torch.randn(2, 3, 12, 11, generator=g, dtype=D), torch.randn(2, 6, 6, 5, generator=g, dtype=D)]
    return head, feats


def test_aspp_official_keys_and_forward():
    head, feats = _aspp()
    g = torch.Generator().manual_seed(0)
    official = {k: (torch.tensor(3) if not s else torch.randn(s, generator=g, dtype=D))
                for k, s in _official_aspp_shapes(6, 8, 5, (1, 2, 3), 3, 4).items()}
    head.load_state_dict(official, strict=True)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.abs_().add_(0.5)
    head.eval()
    base, feat = head.base_forward(feats)
    ref_base, ref_feat = _off_aspp_forward(head, feats)
    assert feat.shape == (2, 8, 12, 11)  # at the stride of inputs[0]
    assert_close(feat, ref_feat, 1e-12, "feat")
    assert_close(base, ref_base, 1e-12, "base")
    assert_close(head(feats), _off_post_refine_proto_v2(head, feat, base, head.conv_seg.weight.squeeze()), 1e-12)
    # the released DeepLabV3+ R-50 + CAC head (2048 -> 512, dilations 1, 12, 24, 36, c1 256 -> 48, 150 classes)
    with torch.device("meta"):
        r50 = DepthwiseSeparableASPPHeadCAC()
    assert {k: tuple(v.shape) for k, v in r50.state_dict().items()} == _official_aspp_shapes(
        2048, 512, 150, (1, 12, 24, 36), 256, 48)


def test_aspp_forward_train_matches_official_and_reaches_every_parameter():
    head, feats = _aspp()
    _check_forward_train_matches_official(head, feats, _labels(2, 24, 22, 5, absent=4))


def test_depthwise_separable_conv_module_by_functional_ops():
    """mmcv's DepthwiseSeparableConvModule: depthwise k x k + BN + ReLU, then 1x1 + BN + ReLU (mmcv's defaults)."""
    from fastseg.models.cac_head import DepthwiseSeparableConvModule

    torch.manual_seed(0)
    m = DepthwiseSeparableConvModule(3, 4, 3, padding=2, dilation=2).to(D).eval()
    with torch.no_grad():
        for bn in (m.depthwise_conv.bn, m.pointwise_conv.bn):
            bn.running_mean.normal_()
            bn.bias.normal_()
    x = torch.randn(2, 3, 6, 7, dtype=D)

    def bn(t, b):
        return F.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, eps=1e-5)

    t = bn(F.conv2d(x, m.depthwise_conv.conv.weight, padding=2, dilation=2, groups=3), m.depthwise_conv.bn).relu()
    t = bn(F.conv2d(t, m.pointwise_conv.conv.weight), m.pointwise_conv.bn).relu()
    assert m.depthwise_conv.conv.bias is None and m.pointwise_conv.conv.bias is None
    assert_close(m(x), t, 1e-12)


def test_fused_cross_entropies_match_eager(device, triton_launches):
    """set_fused(True): the classifier runs fused (the three upsampled CEs as the Triton upsample + CE op, the
    prototypes, cosine classifiers and distillation as fastseg.ops.cac); same losses and gradients."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    head = _head(dropout=0.0).to(device=device, dtype=dtype)
    x = torch.randn(2, 6, 5, 6, device=device, dtype=dtype)
    y = _labels(2, 20, 24, 5, absent=2).to(device)
    eager = head.forward_train([x], y)
    g_eager = torch.autograd.grad(eager["loss_ce"], list(head.parameters()))
    head.set_fused(True)
    fused = head.forward_train([x], y)
    assert triton_launches["upsample_ce_fwd"] == 3
    g_fused = torch.autograd.grad(fused["loss_ce"], list(head.parameters()))
    assert triton_launches["upsample_ce_bwd"] == 3
    for k in eager:
        assert abs(fused[k].item() - eager[k].item()) < tol * max(1.0, abs(eager[k].item())), k
    for (name, _), a, b in zip(head.named_parameters(), g_fused, g_eager):
        assert_close(a, b, tol, name)


def test_bench_op_fastseg_impl(device):
    from fastseg.bench.registry import get_op

    spec = get_op("cac")
    s = spec.full_shape({"B": 1, "C": 8, "K": 5, "H": 4, "W": 4, "stride": 2})
    prepared = spec.impl("fastseg").prepare(s, torch.float32, torch.device(device), "fwdbwd")
    assert prepared.forward().shape == () and torch.isfinite(prepared.forward())
    prepared = spec.impl("fastseg").prepare(s, torch.float32, torch.device(device), "fwd")
    assert prepared.forward().shape == (1, 5, 4, 4)
