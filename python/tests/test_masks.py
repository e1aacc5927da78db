"""The FlexAttention block masks of the PyTorch model equal the C++ pattern's mask pair for pair, at
lengths that reach every tier of the default table."""

import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import build_dir
from drdiff.masks import default_tiers, mask_fn, tier_for
from drdiff.model import DrDiff, ModelConfig


def cpp_mask(n: int, tmp_path) -> np.ndarray:
    exe = os.path.join(build_dir(), "examples", "drdiff-attention-masks")
    if not os.path.isfile(exe):
        pytest.skip(f"{exe} is not built")
    out = tmp_path / f"mask{n}.bin"
    r = subprocess.run([exe, "--dump-hsa", str(n), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bits = np.unpackbits(np.fromfile(out, dtype=np.uint8), bitorder="little")[: n * n]
    return bits.reshape(n, n).astype(bool)


def flex_mask(n: int, causal: bool = False) -> torch.Tensor:
    """The element mask FlexAttention computes with: full blocks all true, partial blocks through
    mask_mod, absent blocks false."""
    m = DrDiff(ModelConfig(vocab=16, embed_dim=8, d_model=64, heads=1, blocks=1, d_ff=8, causal=causal))
    bm = m.block_mask(n, "cpu")
    bs = bm.BLOCK_SIZE[0]
    nb = (n + bs - 1) // bs
    dense = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
    fn = mask_fn(tier_for(m.cfg.tiers, n), n, causal)
    def blocks(num, idx):
        out = []
        for qb in range(nb):
            c = int(num[0, 0, qb])
            out.append([int(x) for x in idx[0, 0, qb, :c]])
        return out
    partial = blocks(bm.kv_num_blocks, bm.kv_indices)
    full = blocks(bm.full_kv_num_blocks, bm.full_kv_indices) if bm.full_kv_num_blocks is not None else [[]] * nb
    for qb in range(nb):
        q = torch.arange(qb * bs, (qb + 1) * bs).view(-1, 1)
        for kb in full[qb]:
            dense[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs] = True
        for kb in partial[qb]:
            k = torch.arange(kb * bs, (kb + 1) * bs).view(1, -1)
            dense[qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs] = fn(q, k)
    return dense[:n, :n]


@pytest.mark.parametrize("n", [700, 1100, 4097, 9000, 16500])
def test_block_masks_equal_the_cpp_hsa_mask(n, tmp_path):
    ref = cpp_mask(n, tmp_path)
    ours = flex_mask(n).numpy()
    diff = np.argwhere(ref != ours)
    assert diff.size == 0, f"first differing pairs (q, k): {diff[:5].tolist()}"


def test_tier_table_matches_the_library_default():
    t = default_tiers()
    assert [x.max_len for x in t][:3] == [1024, 4096, 16384]
    assert tier_for(t, 1024).dense and not tier_for(t, 1025).dense
    assert tier_for(t, 1100).num_global(1100) == 34  # ceil(sqrt(1100)), cap 64
    assert tier_for(t, 20000).num_global(20000) == 128


def test_causal_mask_is_the_hsa_mask_and_j_le_i():
    n = 1500
    a = flex_mask(n, causal=True)
    i = torch.arange(n).view(-1, 1)
    j = torch.arange(n).view(1, -1)
    ref = mask_fn(tier_for(default_tiers(), n), n)(i, j) & (j <= i)
    assert torch.equal(a, ref)
