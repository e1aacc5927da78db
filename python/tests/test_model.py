"""The PyTorch model: names, shapes and dtypes against the C++ parameter_specs, the loss falling when
overfitting a tiny batch, export then load, and the sampler's noise against the C++ noise."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import ROOT, build_dir
from drdiff import export as ex
from drdiff.model import DrDiff, ModelConfig, alpha_bar, soft_absorb
from drdiff.sampler import gaussian_noise, plan, grid_uniform_t
from drdiff.train import denoise_loss, make_noisy

TINY = dict(vocab=300, embed_dim=16, d_model=128, heads=2, blocks=2, experts=4, d_ff=64, time_dim=32)


def generate_bin():
    p = os.path.join(build_dir(), "examples", "drdiff-generate")
    if not os.path.isfile(p):
        pytest.skip(f"{p} is not built")
    return p


@pytest.mark.parametrize("over", [{}, {"activation": "swiglu", "shared_experts": 1}, {"prediction": "embedding"},
                                  {"self_condition": True}])
def test_names_shapes_dtypes_match_parameter_specs(tmp_path, over):
    cfg = ModelConfig(**{**TINY, **over})
    m = DrDiff(cfg)
    ex.export(m, os.path.join(ROOT, "models", "drdiff-text", "tokenizer.model"), str(tmp_path), dtype="f32")
    out = subprocess.run([generate_bin(), "--model", str(tmp_path), "--list-tensors"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    specs = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    ours = m.library_state_dict()
    assert [s["name"] for s in specs] == list(ours.keys())
    for s in specs:
        assert list(ours[s["name"]].shape) == s["shape"], s["name"]
        assert ours[s["name"]].dtype == torch.float32


def test_loss_falls_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    m = DrDiff(ModelConfig(**TINY))
    ids = torch.randint(0, 300, (2, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    xt, t, target = make_noisy(m, ids, 0.5, 0.0, g)  # one noised batch, seen again and again
    xt = xt.detach()
    losses = []
    for step in range(80):
        loss, aux = denoise_loss(m, xt, t, ids, target, "sdpa")
        (loss + 0.01 * aux["balance"]).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_export_then_load_round_trips(tmp_path):
    m = DrDiff(ModelConfig(**TINY)).eval()
    tok = os.path.join(ROOT, "models", "drdiff-text", "tokenizer.model")
    ex.export(m, tok, str(tmp_path), dtype="f32")
    back, c = ex.load(str(tmp_path))
    a, b = m.library_state_dict(), back.library_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 80, 16)
    t = torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, backend="sdpa")[0], back(x, t, backend="sdpa")[0], rtol=1e-5, atol=1e-5)
    assert c["prediction"] == "categorical" and c["tokenizer"]["file"] == "tokenizer.model"


def test_export_refuses_the_autoregressive_model(tmp_path):
    with pytest.raises(ValueError, match="autoregressive"):
        ex.export(DrDiff(ModelConfig(**TINY, causal=True)), "x", str(tmp_path))


def test_soft_absorb_keeps_source_tokens_and_absorbs_at_rate_one():
    x0 = torch.randn(2, 50, 8)
    m = torch.full((8,), 0.5)
    target = torch.zeros(2, 50, dtype=torch.bool)
    target[:, 10:] = True
    xt = soft_absorb(x0, m, torch.tensor([0.0, 0.0], dtype=torch.float64), target, 1.0)
    assert torch.equal(xt[:, :10], x0[:, :10])
    assert torch.equal(xt[:, 10:], m.expand(2, 40, 8))  # sqrt(1 - 0) * 1 = 1: every target token absorbed
    xt = soft_absorb(x0, m, torch.tensor([1.0, 1.0], dtype=torch.float64), target, 0.0)
    torch.testing.assert_close(xt, x0)


def test_alpha_bar_is_the_sqrt_schedule():
    t = torch.tensor([0.0, 0.5, 0.99], dtype=torch.float64)
    torch.testing.assert_close(alpha_bar(t), 1 - torch.sqrt(t + 1e-4))


def test_noise_is_the_libraries_counter_based_normals():
    z = gaussian_noise(7, 0, 100000)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02
    assert np.array_equal(z[:10], gaussian_noise(7, 0, 10))
    assert not np.array_equal(z[:10], gaussian_noise(8, 0, 10))


def test_solver_plan_orders_and_first_step_is_ddim():
    g = grid_uniform_t(10)
    p2 = plan(2, g)
    assert p2[0].order == 1 and p2[1].order == 2 and p2[-1].order == 1  # lower order final below 15 steps
    p3 = plan(3, grid_uniform_t(20))
    assert [k.order for k in p3[:3]] == [1, 2, 3]


def test_time_warp_samples_where_the_loss_is():
    from drdiff.train import TimeWarp

    w = TimeWarp(bins=10, floor=0.2, decay=0.0)
    # A loss that is zero below t = 0.5 and 1 above: 80 % of the mass goes to the upper half, plus
    # the 20 % uniform floor split evenly.
    t = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    w.update(t, (t > 0.5).float())
    p = w.density()
    assert abs(p.sum() - 1) < 1e-12 and abs(p[5:].sum() - 0.9) < 1e-5
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    s = w.sample(u)
    assert float(s.min()) >= 0 and float(s.max()) < 1
    assert abs(float((s >= 0.5).double().mean()) - 0.9) < 1e-3
    assert torch.all(s[1:] >= s[:-1])  # monotone: stratification survives the warp


def test_self_conditioning_starts_as_the_same_function_and_then_uses_the_estimate():
    torch.manual_seed(1)
    plain = DrDiff(ModelConfig(**TINY)).eval()
    sc = DrDiff(ModelConfig(**TINY, self_condition=True)).eval()
    missing, unexpected = sc.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["up_sc.weight"] and not unexpected
    assert torch.count_nonzero(sc.up_sc.weight) == 0  # zero at initialisation
    x, t, prev = torch.randn(1, 70, 16), torch.tensor([0.6]), torch.randn(1, 70, 16)
    with torch.no_grad():
        ref = plain(x, t, backend="sdpa")[0]
        torch.testing.assert_close(sc(x, t, backend="sdpa", x0_prev=prev)[0], ref, rtol=0, atol=0)
        sc.up_sc.weight.normal_(0, 0.3)
        assert not torch.allclose(sc(x, t, backend="sdpa", x0_prev=prev)[0], ref, atol=1e-3)
        torch.testing.assert_close(sc(x, t, backend="sdpa")[0], ref, rtol=0, atol=0)  # None: no estimate yet


def test_self_conditioned_training_loss_runs_and_falls():
    torch.manual_seed(0)
    m = DrDiff(ModelConfig(**TINY, self_condition=True))
    ids = torch.randint(0, 300, (4, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    xt, t, target = make_noisy(m, ids, 0.5, 0.0, g)
    losses = []
    for _ in range(60):
        loss, _ = denoise_loss(m, xt.detach(), t, ids, target, "sdpa")
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert torch.count_nonzero(m.up_sc.weight) > 0  # the estimate's path was trained


@pytest.mark.parametrize("solver,steps,seed", [("2m", 6, 5), ("ddim", 4, 9)])
def test_cpp_generation_of_a_self_conditioned_model_equals_pytorchs(tmp_path, solver, steps, seed):
    from drdiff.data import Tokenizer
    from drdiff.sampler import SampleSettings, generate

    tok_path = os.path.join(ROOT, "models", "drdiff-text", "tokenizer.model")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab=8192, embed_dim=16, d_model=64, heads=2, blocks=2, experts=4, d_ff=64, time_dim=32,
                      self_condition=True)
    m = DrDiff(cfg).eval()
    with torch.no_grad():
        m.up_sc.weight.normal_(0, 0.5)  # a trained model's path, not the zero start
    ex.export(m, tok_path, str(tmp_path), dtype="f32")
    back, c = ex.load(str(tmp_path))
    assert c["self_condition"] is True and back.cfg.self_condition
    tok = Tokenizer(tok_path)
    prompt = "The kernel"
    ids = generate(back, tok.encode([prompt])[0], 48, seed, SampleSettings(solver=solver, steps=steps))[0]
    out = subprocess.run([generate_bin(), "--model", str(tmp_path), "--prompt", prompt, "--length", "48", "--steps",
                          str(steps), "--solver", solver, "--seed", str(seed), "--raw", "--no-echo", "--threads", "1"],
                         capture_output=True)  # bytes: a generated "\r" must stay one
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode("utf-8", "replace").rstrip("\n") == tok.decode(ids)
    # Without the estimate (the same weights, up_sc zeroed) the text differs: the path is used.
    with torch.no_grad():
        back.up_sc.weight.zero_()
    assert generate(back, tok.encode([prompt])[0], 48, seed, SampleSettings(solver=solver, steps=steps))[0] != ids
