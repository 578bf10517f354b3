"""fastseg.records: one record per fused op, and the tools (check, patch, bench, CLI) all read them."""
import torch
from torch import nn

import fastseg
from fastseg import records
from fastseg.bench import check as check_mod
from fastseg.bench.registry import all_ops


def test_every_tool_reads_the_records():
    names = [r.name for r in records.RECORDS]
    assert len(set(names)) == len(names) and len({r.check_name for r in records.RECORDS}) == len(names)
    assert set(check_mod.CHECKS) == {r.check_name for r in records.RECORDS if r.check is not None}
    from fastseg.patch import OPS

    assert OPS == tuple(r.name for r in records.RECORDS if r.patchable)
    bench = all_ops()
    for r in records.RECORDS:
        assert r.bench and all(b in bench for b in r.bench), r.name  # a renamed bench op breaks this
        if r.nn_class is not None:
            assert r.fastseg_class() is getattr(fastseg.nn, r.nn_class), r.name
        assert records.get(r.name) is r and records.get(r.check_name) is r


def test_probes_are_tiny_and_on_the_module_device_and_dtype():
    """Each patchable record's probe inputs: drawn from the given generator only, in the module's dtype."""
    from fastseg.nn import MSDeformAttnHF
    from fastseg.reference import ATMAttention, AttentionModule, CACClassifier, Cluster, ReferenceMSDeformAttn

    examples = {"masked_attention": nn.MultiheadAttention(16, 2, batch_first=True),
                "msca": AttentionModule(4), "context_cluster": Cluster(8, 8, heads=2, head_dim=4, fold_w=2, fold_h=2),
                "ms_deform_attn": ReferenceMSDeformAttn(16, 2, 2, 2), "ms_deform_attn_hf": MSDeformAttnHF(16, 2, 2, 2),
                "cac": CACClassifier(8, 5), "atm_attention": ATMAttention(16, 2)}
    assert set(examples) == {r.name for r in records.RECORDS if r.patchable}
    for name, m in examples.items():
        rec = records.get(name)
        m = m.double()
        rng = torch.get_rng_state()
        a = rec.probe(m, torch.device("cpu"), torch.float64, torch.Generator().manual_seed(0))
        b = rec.probe(m, torch.device("cpu"), torch.float64, torch.Generator().manual_seed(0))
        assert torch.equal(torch.get_rng_state(), rng)
        assert a and all(isinstance(p, records.Probe) for p in a)
        for pa, pb in zip(a, b):
            for x, y in zip(pa.inputs, pb.inputs):
                assert x.dtype == torch.float64 and torch.equal(x, y) and x.numel() <= 4096
            out = pa.call(m, *pa.inputs)
            assert torch.isfinite(out if pa.keep is None else out[pa.keep.expand_as(out)]).all(), name
