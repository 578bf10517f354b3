"""No fused op makes the host wait for the device: every aten op dispatched in each op's forward and backward
is recorded (TorchDispatchMode, :class:`fastseg.bench.opcount.OpRecorder`) and none may be a sync op
(``.item()`` / ``_local_scalar_dense``, ``nonzero``, ``is_nonzero``, ``equal``, ``masked_select``, ``unique``,
... see :data:`fastseg.bench.opcount.SYNC_OPS`)."""
import pytest
import torch

from fastseg.bench.opcount import CASES, SYNC_OPS, OpRecorder, count

# cases known to sync, inherent to their API: xfail with the reason
KNOWN_SYNC: dict = {
    "op mask_losses_from_embeddings (batch_idx)":
        "groups the pairs per image (one GEMM each) by reading batch_idx (T,) on the host (min/max check, "
        "bincount); batch_idx is the Hungarian matcher's (scipy, CPU), so that is a read of host memory, and a "
        "CUDA batch_idx costs a device-to-host copy. pairs_per_image= (host counts, the 'op "
        "mask_losses_from_embeddings' case, what MaskFormer's criterion passes) reads no tensor",
}


def test_recorder_catches_syncs(device):
    # the check itself can fail: .item(), nonzero and equal are seen
    if device != "cpu":
        pytest.skip("interpreter-only helper check")
    t = torch.randn(5)
    rec = OpRecorder()
    with rec:
        t.sum().item()
        t.nonzero()
        torch.equal(t, t)
    assert {"_local_scalar_dense", "nonzero", "equal"} <= set(rec.sync) <= SYNC_OPS


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_host_sync(name, device, triton_launches):
    if device != "cpu":
        pytest.skip("the cases are built on CPU tensors under the interpreter")
    build, grad = CASES[name]
    fn, leaves = build(torch.float32)
    res = count(fn, leaves, grad=grad, warmup=False)  # the first call: includes building the weight caches
    assert res["forward"]["launches"] > 0, f"{name}: the Triton path did not run"
    if name in KNOWN_SYNC:  # an entry that no longer syncs is stale: it must go
        assert res["forward"]["sync"] or res["backward"]["sync"], f"{name} no longer syncs: drop it from KNOWN_SYNC"
        pytest.xfail(KNOWN_SYNC[name])
    for phase in ("forward", "backward"):
        assert res[phase]["sync"] == [], f"{name} {phase}: host-device syncs {res[phase]['sync']}"
