"""drdiff.attention_op, the library's attention (forward and backward) as a PyTorch operator: outputs
and gradients against SDPA with the same boolean mask (masks.py, itself checked against the C++
mask in test_masks.py), gradcheck in float64, torch.compile with no graph break and no
recompilation as N changes, the operator inside the project's model, and its errors."""

import pytest
import torch
import torch.nn.functional as F

from drdiff.masks import INT_MAX, Tier, default_tiers, dense_mask, tier_for

from drdiff import attention_op as op  # its C++ side is compiled on the first call (about 40 s)

SMALL = [  # every tier reached at test sizes (test/support/user_policies.hpp's small_tiers)
    Tier(64, True, 0, 1, 0, 0, 0),
    Tier(256, False, 16, 2, 64, 0, 8),
    Tier(600, False, 16, 4, 128, 8, 0),
    Tier(INT_MAX, False, 16, 8, 256, 16, 0),
]


def sdpa(q, k, v, tiers, kv_lens=None):
    n = q.shape[2]
    m = dense_mask(tier_for(tiers, n), n)
    m = m.view(1, 1, n, n).expand(q.shape[0], 1, n, n).clone()
    if kv_lens is not None:
        m &= (torch.arange(n).view(1, 1, 1, n) < kv_lens.view(-1, 1, 1, 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def inputs(b, h, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("n", [40, 100, 257, 640])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_gradients_match_sdpa_on_the_same_mask(n, dtype):
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    q, k, v = inputs(2, 2, n, 32, dtype, seed=n)
    g = torch.randn(2, 2, n, 32, dtype=dtype)
    o = op.hsa_attention(q, k, v, SMALL)
    ref = sdpa(q, k, v, SMALL)
    assert (o - ref).abs().max() <= tol * ref.abs().max()
    got = torch.autograd.grad(o, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, x, y in zip("qkv", got, want):
        assert (x - y).abs().max() <= 20 * tol * y.abs().max(), name


def test_padded_batches_strided_inputs_and_the_default_table():
    q, k, v = inputs(2, 3, 300, 64, torch.float64)
    lens = torch.tensor([300, 123])
    tiers = [Tier(INT_MAX, False, 24, 3, 90, 4, 0)]
    o = op.hsa_attention(q, k, v, tiers, kv_lens=lens)
    ref = sdpa(q, k, v, tiers, lens)
    assert torch.allclose(o, ref, atol=1e-10)
    # [B, N, H, D] storage seen as [B, H, N, D]: strided, no copy
    qs = torch.randn(1, 1200, 2, 64, dtype=torch.float64).transpose(1, 2)
    ks = torch.randn(1, 1200, 2, 64, dtype=torch.float64).transpose(1, 2)
    vs = torch.randn(1, 1200, 2, 64, dtype=torch.float64).transpose(1, 2)
    assert torch.allclose(op.hsa_attention(qs, ks, vs, default_tiers()), sdpa(qs, ks, vs, default_tiers()), atol=1e-10)


def test_the_lse_and_its_gradient():
    q, k, v = inputs(1, 2, 300, 32, torch.float64, seed=5)
    g, h = torch.randn(1, 2, 300, 32, dtype=torch.float64), torch.randn(1, 2, 300, dtype=torch.float64)
    o, lse = op.hsa_attention(q, k, v, SMALL, return_lse=True)
    m = dense_mask(tier_for(SMALL, 300), 300)
    s = (q @ k.transpose(-1, -2) / 32 ** 0.5).masked_fill(~m, float("-inf"))
    lse_ref = torch.logsumexp(s, -1)
    o_ref = s.softmax(-1) @ v
    assert torch.allclose(lse, lse_ref, atol=1e-12) and torch.allclose(o, o_ref, atol=1e-12)
    got = torch.autograd.grad((o * g).sum() + (lse * h).sum(), (q, k, v), retain_graph=True)
    want = torch.autograd.grad((o_ref * g).sum() + (lse_ref * h).sum(), (q, k, v), retain_graph=True)
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-10)
    only_lse = torch.autograd.grad(lse.sum(), (q, k), allow_unused=True)  # o unused: dO is zero
    ref_lse = torch.autograd.grad(lse_ref.sum(), (q, k))
    for x, y in zip(only_lse, ref_lse):
        assert torch.allclose(x, y, atol=1e-10)


def test_gradcheck_in_float64():
    q, k, v = inputs(1, 2, 24, 32, torch.float64, seed=3)
    tiers = op.single_tier(window=3, rate=4, span=12, globals_count=2)
    assert torch.autograd.gradcheck(lambda a, b, c: op.hsa_attention(a, b, c, tiers), (q, k, v), eps=1e-6, atol=1e-7)


def test_under_torch_compile_no_graph_break_and_no_recompile_as_n_changes():
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        return op.hsa_attention(q, k, v, SMALL).square().sum()

    cf = torch.compile(f, backend=counting, fullgraph=True, dynamic=True)
    for n in (300, 700, 1100):  # two tiers: the tier is picked inside the operator, at run time
        q, k, v = inputs(1, 2, n, 32, torch.float32, seed=n)
        assert torch.allclose(cf(q, k, v), f(q, k, v))
    assert len(graphs) == 1
    # and with the backward: AOTAutograd traces the backward operator into the backward graph
    cg = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (500, 900):
        q, k, v = inputs(1, 2, n, 32, torch.float32, seed=n)
        got = torch.autograd.grad(cg(q, k, v), (q, k, v))
        for x, y in zip(got, torch.autograd.grad(f(q, k, v), (q, k, v))):
            assert torch.allclose(x, y)


def test_the_operator_in_the_model_reproduces_its_sdpa_loss_and_gradients():
    from drdiff.model import DrDiff, ModelConfig
    from drdiff.train import denoise_loss, make_noisy

    torch.manual_seed(0)
    m = DrDiff(ModelConfig(vocab=300, embed_dim=16, d_model=128, heads=2, blocks=2, experts=4, d_ff=64, time_dim=32,
                           tiers=SMALL))
    ids = torch.randint(0, 300, (2, 400))  # tier 2 of SMALL: window, dilation and global tokens
    xt, t, target = make_noisy(m, ids, 0.5, 0.0, torch.Generator().manual_seed(1))
    results = []
    for backend in ("sdpa", "drdiff"):
        m.zero_grad()
        loss, _ = denoise_loss(m, xt.detach(), t, ids, target, backend)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert (g0[n] - g1[n]).abs().max() <= 1e-4 * g0[n].abs().max() + 1e-7, n


def test_clear_errors():
    q, k, v = inputs(1, 2, 64, 32, torch.float32)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op.hsa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), SMALL)
    with pytest.raises(RuntimeError, match="shape"):
        op.hsa_attention(q, k[:, :, :32], v, SMALL)
    with pytest.raises(RuntimeError, match="last dimension"):
        op.hsa_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), SMALL)
    with pytest.raises(RuntimeError, match="head_dim = 36"):
        op.hsa_attention(*(torch.randn(1, 1, 10, 36) for _ in range(3)), SMALL)
    with pytest.raises(RuntimeError, match=r"above the last tier's max_len = 50"):
        op.hsa_attention(q, k, v, [Tier(50, True, 0, 1, 0, 0, 0)])
    with pytest.raises(ValueError, match="empty"):
        op.hsa_attention(q, k, v, [])
    with pytest.raises(RuntimeError, match="kv_lens"):
        op.hsa_attention(q, k, v, SMALL, kv_lens=torch.tensor([1, 2]))
