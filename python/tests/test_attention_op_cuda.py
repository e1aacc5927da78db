"""drdiff.attention_op on CUDA tensors (the library's CUDA forward and backward): outputs and gradients
against SDPA with the same boolean mask in float32 (bf16 and fp16 tolerance), against FlexAttention's
gradients on the same block mask, fp32 at tight tolerance, the lse, padded batches, torch.compile with
no graph break, the operator inside the project's model, and errors. Skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F

from drdiff.masks import INT_MAX, Tier, default_tiers, dense_mask, tier_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from drdiff import attention_op as op  # noqa: E402  (the CUDA side compiles with nvcc on first use)

SMALL = [  # every tier reached at test sizes (as in test_attention_op.py)
    Tier(64, True, 0, 1, 0, 0, 0),
    Tier(256, False, 16, 2, 64, 0, 8),
    Tier(600, False, 16, 4, 128, 8, 0),
    Tier(INT_MAX, False, 16, 8, 256, 16, 0),
]
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def mask_of(tiers, n, kv_lens=None, batch=1):
    m = dense_mask(tier_for(tiers, n), n).cuda().view(1, 1, n, n).expand(batch, 1, n, n).clone()
    if kv_lens is not None:
        m &= torch.arange(n, device="cuda").view(1, 1, 1, n) < kv_lens.view(-1, 1, 1, 1)
    return m


def inputs(b, h, n, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device="cuda").to(dtype).requires_grad_() for _ in range(3)]


def rel(x, y):
    return float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(40, 64), (257, 64), (640, 128), (1500, 64)])
def test_outputs_and_gradients_match_sdpa_in_float32(dtype, n, d):
    q, k, v = inputs(2, 2, n, d, dtype, seed=n)
    g = torch.randn(2, 2, n, d, device="cuda").to(dtype)
    o = op.hsa_attention(q, k, v, SMALL)
    # The reference: float32 math on the same rounded inputs.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask_of(SMALL, n, batch=2))
    assert rel(o, ref) <= TOL[dtype]
    got = torch.autograd.grad(o, (q, k, v), g)
    want = torch.autograd.grad(ref, (q32, k32, v32), g.float())
    for name, x, y in zip("qkv", got, want):
        assert rel(x, y) <= 2 * TOL[dtype], name


def test_gradients_match_flex_attention_on_the_same_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from drdiff.masks import mask_fn

    n, tiers = 4096, default_tiers()
    fn = mask_fn(tier_for(tiers, n), n, False)
    bm = create_block_mask(lambda b, h, i, j: fn(i, j), None, None, n, n, device="cuda")
    q, k, v = inputs(1, 4, n, 64, torch.bfloat16, seed=7)
    g = torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16)
    o = op.hsa_attention(q, k, v, tiers)
    qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))
    of = torch.compile(flex_attention)(qf, kf, vf, block_mask=bm)
    assert rel(o, of) <= 2e-2
    for name, x, y in zip("qkv", torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(of, (qf, kf, vf), g)):
        assert rel(x, y) <= 4e-2, name


def test_padded_batches_the_lse_and_its_gradient():
    n = 300
    q, k, v = inputs(2, 2, n, 64, torch.float32, seed=3)
    lens = torch.tensor([300, 123], device="cuda")
    tiers = [Tier(INT_MAX, False, 24, 3, 90, 4, 0)]
    o, lse = op.hsa_attention(q, k, v, tiers, kv_lens=lens, return_lse=True)
    assert lse.dtype == torch.float32
    m = mask_of(tiers, n, lens, batch=2)
    s = (q @ k.transpose(-1, -2) / 8.0).masked_fill(~m, float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    o_ref = s.softmax(-1) @ v
    assert rel(o, o_ref) <= 1e-4 and rel(lse, lse_ref) <= 1e-4
    g, h = torch.randn_like(o), torch.randn_like(lse)
    got = torch.autograd.grad((o * g).sum() + (lse * h).sum(), (q, k, v))
    want = torch.autograd.grad((o_ref * g).sum() + (lse_ref * h).sum(), (q, k, v))
    for name, x, y in zip("qkv", got, want):
        assert rel(x, y) <= 2e-4, name


def test_compiles_into_one_graph_and_its_gradients_follow():
    f = torch.compile(lambda q, k, v: op.hsa_attention(q, k, v, SMALL).square().sum(), fullgraph=True, dynamic=True)
    for n in (300, 700):
        q, k, v = inputs(1, 2, n, 64, torch.bfloat16, seed=n)
        loss = f(q, k, v)
        got = torch.autograd.grad(loss, (q, k, v))
        q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(op.hsa_attention(q2, k2, v2, SMALL).square().sum(), (q2, k2, v2))
        for x, y in zip(got, want):
            assert rel(x, y) <= 1e-2


def test_errors_name_the_problem():
    q, k, v = inputs(1, 2, 100, 96, torch.bfloat16)
    with pytest.raises(RuntimeError, match="head_dim = 96"):
        op.hsa_attention(q, k, v, SMALL)
    q, k, v = inputs(1, 2, 100, 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="is on cpu"):
        op.hsa_attention(q, k.detach().cpu(), v, SMALL)
    with pytest.raises(RuntimeError, match="takes bfloat16, float16 or float32"):
        op.hsa_attention(q.double(), k.double(), v.double(), SMALL)
    with pytest.raises(RuntimeError, match="kv_lens must lie in"):
        op.hsa_attention(q, k, v, SMALL, kv_lens=torch.tensor([101], device="cuda"))


def test_the_model_loss_and_gradients_equal_flex_attention():
    from drdiff.model import DrDiff, ModelConfig
    from drdiff.train import denoise_loss, make_noisy

    torch.manual_seed(0)
    cfg = ModelConfig(vocab=300, embed_dim=16, d_model=128, heads=2, blocks=2, experts=4, d_ff=64, time_dim=32)
    m = DrDiff(cfg).cuda()
    ids = torch.randint(0, 300, (2, 1500), device="cuda")
    xt, t, target = make_noisy(m, ids, 0.5, 0.0, torch.Generator(device="cuda").manual_seed(1))
    losses, grads = [], []
    for backend in ("flex", "drdiff"):
        m.zero_grad()
        loss, _ = denoise_loss(m, xt, t, ids, target, m.block_mask(1500, "cuda") if backend == "flex" else "drdiff")
        loss.backward()
        losses.append(float(loss))
        grads.append({n_: p.grad.detach().clone() for n_, p in m.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) <= 2e-2 * abs(losses[0])
    for name, g in grads[0].items():
        assert rel(grads[1][name], g) <= 5e-2, name
