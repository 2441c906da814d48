"""Pooling input checks (metaembed.pooling): malformed rows raise instead of pooling the wrong positions."""
from __future__ import annotations

import pytest
import torch

from metaembed.pooling import l2_normalize, pool_last, pool_mean, pool_meta, pool_split, split_weights


def _hidden(B: int = 1, L: int = 5) -> torch.Tensor:
    return torch.arange(L, dtype=torch.float32)[None, :, None].expand(B, L, 3).clone()  # value = position


def test_pool_meta_needs_every_meta_token_id_exactly_once():
    ids = torch.tensor([[7, 100, 8, 100, 9]])  # <meta_0> twice, <meta_1> missing: the count R=2 is right
    with pytest.raises(ValueError, match="row 0 holds Meta Token id 10[01] .* each of the R=2 ids must occur exactly once"):
        pool_meta(_hidden(), ids, torch.ones_like(ids), first_id=100, R=2)
    ok = torch.tensor([[7, 101, 8, 100, 9], [100, 101, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert pool_meta(_hidden(2), ok, mask, first_id=100, R=2)[:, :, 0].tolist() == [[3.0, 1.0], [0.0, 1.0]]
    padded_dup = torch.tensor([[100, 101, 100, 0, 0]])  # a duplicate under padding is not a token
    pool_meta(_hidden(), padded_dup, torch.tensor([[1, 1, 0, 0, 0]]), first_id=100, R=2)


@pytest.mark.parametrize("pool", [pool_last, pool_mean, lambda h, m: pool_split(h, m, 2), lambda h, m: split_weights(m, 2)],
                         ids=["last", "mean", "split", "split_weights"])
def test_poolings_reject_an_all_padding_row(pool):
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\] are all padding"):
        pool(_hidden(2), mask)
    pool(_hidden(2), torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]))  # one real token is enough


def test_valid_rows_pool_as_before():
    h = _hidden(2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    assert pool_last(h, mask)[:, 0, 0].tolist() == [2.0, 4.0]
    assert pool_mean(h, mask)[:, 0, 0].tolist() == [1.0, 2.5]
    assert pool_split(h, mask, 2)[:, :, 0].tolist() == [[0.0, 1.5], [1.5, 3.5]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_mean_sums_and_counts_in_fp32(dtype):
    """The fp16 sum of 1000 tokens of 100.0 overflowed to inf (reported as a NaN/Inf input by the model)."""
    h = torch.full((2, 1000, 4), 100.0, dtype=dtype)
    mask = torch.ones(2, 1000, dtype=torch.long)
    mask[1, :3] = 0  # 997 real tokens; bf16 cannot hold 997 exactly
    h[1, 3] = 3097.0  # row 1: mean = 100 + 2997 / 997
    out = pool_mean(h, mask)
    assert out.dtype == dtype and out.shape == (2, 1, 4)
    want = torch.tensor([100.0, 100.0 + 2997.0 / 997.0])[:, None, None].expand(2, 1, 4)
    torch.testing.assert_close(out.float(), want, rtol=4e-3, atol=0)


def test_mean_and_split_never_read_padding_values():
    """Padding hidden states are arbitrary: a NaN/Inf there was multiplied by 0 (NaN) and poisoned the row."""
    h = _hidden(2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    dirty = h.clone()
    dirty[0, 3], dirty[0, 4], dirty[1, 0] = float("nan"), float("inf"), float("-inf")  # padding only
    assert torch.equal(pool_mean(dirty, mask), pool_mean(h, mask))
    assert torch.equal(pool_split(dirty, mask, 2), pool_split(h, mask, 2))
    assert pool_mean(dirty, mask)[:, 0, 0].tolist() == [1.0, 2.5]


def test_pool_meta_accepts_int32_input_ids():
    """int32 ids (e.g. from a NumPy collate) crashed in scatter_add_ ("Expected self.dtype to be equal to
    src.dtype")."""
    ids = torch.tensor([[7, 101, 8, 100, 9], [100, 101, 0, 0, 0]], dtype=torch.int32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.int32)
    assert pool_meta(_hidden(2), ids, mask, first_id=100, R=2)[:, :, 0].tolist() == [[3.0, 1.0], [0.0, 1.0]]


def _meta2(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([100, 101] + [0] * (m.shape[1] - 2)).expand(m.shape)  # both Meta Tokens in every row
    return pool_meta(h, ids, m, first_id=100, R=2)


@pytest.mark.parametrize("pool", [pool_last, pool_mean, lambda h, m: pool_split(h, m, 2), _meta2],
                         ids=["last", "mean", "split", "meta"])
def test_poolings_reject_a_mask_of_another_shape(pool):
    """A [1, L] mask for a [2, L, D] batch broadcast silently (row 1 pooled with row 0's mask), and a
    [B, L] mask for a longer hidden [B, L', D] read positions that do not belong to the mask."""
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\), hidden \(2, 5, 3\)"):
        pool(_hidden(2), torch.tensor([[1, 1, 0, 0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), hidden \(2, 7, 3\)"):
        pool(_hidden(2, 7), torch.ones(2, 5, dtype=torch.long))


def test_pool_meta_rejects_ids_of_another_shape_and_bad_R():
    ids = torch.tensor([[7, 101, 8, 100, 9]])
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 5\), hidden \(1, 6, 3\)"):
        pool_meta(_hidden(1, 6), ids, torch.ones(1, 6, dtype=torch.long), first_id=100, R=2)
    for pool in (lambda R: pool_meta(_hidden(), ids, torch.ones_like(ids), 100, R),
                 lambda R: pool_split(_hidden(), torch.ones(1, 5), R), lambda R: split_weights(torch.ones(1, 5), R)):
        with pytest.raises(ValueError, match="R must be an int >= 1, got 0"):
            pool(0)  # an empty [B, 0, D] embedding before


def test_l2_normalize_gives_unit_euclidean_rows_in_fp32():
    """§3.2: embeddings are L2-normalised (so MaxSim sums cosine similarities), in fp32 whatever the input."""
    x = torch.tensor([[[3.0, 4.0], [0.0, -2.0]]], dtype=torch.bfloat16)  # [1, 2, 2]
    out = l2_normalize(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[[0.6, 0.8], [0.0, -1.0]]]))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1, 2))


def test_pool_split_keeps_a_half_precision_hidden_dtype():
    """The published backbones run in bf16: the fp32 segment weights are cast to the hidden dtype before the bmm
    (a float32 @ bfloat16 bmm raised, so every split-(R_q, R_c) baseline crashed on a real checkpoint)."""
    h = _hidden(2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    for dtype in (torch.bfloat16, torch.float16):
        out = pool_split(h.to(dtype), mask, 2)
        assert out.dtype == dtype and out[:, :, 0].float().tolist() == [[0.0, 1.5], [1.5, 3.5]]


def test_poolings_refuse_a_bool_or_float_R_and_malformed_shapes():
    """R=True pooled one vector and R=2.0 crashed deep inside torch; a 4-D hidden was pooled by single-last into a
    [B, 1, D, E] tensor and a 3-D mask reached split_weights' unpacking: each is named as the caller's error."""
    ids = torch.tensor([[7, 101, 8, 100, 9]])
    for R in (True, 2.0):
        for pool in (lambda R: pool_meta(_hidden(), ids, torch.ones_like(ids), 100, R),
                     lambda R: pool_split(_hidden(), torch.ones(1, 5), R), lambda R: split_weights(torch.ones(1, 5), R)):
            with pytest.raises(ValueError, match=f"R must be an int >= 1, got {R!r}"):
                pool(R)
    h4 = _hidden()[..., None]  # [1, 5, 3, 1]
    for pool in (pool_last, pool_mean):
        with pytest.raises(ValueError, match=r"hidden must be \[B, L, D\], got shape \(1, 5, 3, 1\)"):
            pool(h4, torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, L\], got shape \(1, 1, 5\)"):
        split_weights(torch.ones(1, 1, 5), 2)
