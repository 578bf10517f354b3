# control: two unpatched HF Mask2Former runs whose initial weights differ by ~1e-7 relative (rounding-level)
import json, statistics as st, torch
import fastseg.bench.convergence as cv
orig = cv.build
def perturbed(*a, **k):
    m = orig(*a, **k)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
    return m
torch.set_num_threads(1)
ref = cv.train("hf-mask2former", False, 100, size="bench")
cv.build = perturbed
ctl = cv.train("hf-mask2former", False, 100, size="bench")
rel = [abs(a - b) / abs(a) for a, b in zip(ref.losses, ctl.losses)]
print("max rel diff", max(rel), "step1", rel[0])
for a, b in ((0, 10), (10, 50), (50, 80), (80, 100)):
    print(a, b, round(st.mean(ref.losses[a:b]), 3), round(st.mean(ctl.losses[a:b]), 3))
json.dump({"reference": ref.losses, "perturbed_1e-7": ctl.losses}, open("/tmp/hfcontrol.json", "w"))
