"""Matryoshka groups and retrieval budgets (metaembed.groups)."""
from __future__ import annotations

import numpy as np
import pytest

from metaembed import config
from metaembed.groups import (
    DEFAULT_GROUPS,
    GroupError,
    format_budget,
    group_key,
    parse_budget,
    validate_budget,
    validate_groups,
)


def test_default_groups_are_the_papers_and_valid():
    assert DEFAULT_GROUPS is config.DEFAULT_GROUPS
    assert validate_groups(DEFAULT_GROUPS, R_q=16, R_c=64) == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]


def test_validate_groups_normalises_to_int_tuples():
    out = validate_groups([[1, 2], (np.int64(3), 4)], R_q=3, R_c=4)
    assert out == [(1, 2), (3, 4)]
    assert all(type(x) is int for g in out for x in g)


def test_single_group_and_last_group_below_R_are_allowed():
    assert validate_groups([(1, 1)], R_q=1, R_c=1) == [(1, 1)]
    assert validate_groups([(2, 4), (8, 16)], R_q=16, R_c=64) == [(2, 4), (8, 16)]


def test_not_strictly_nested_names_the_offending_pair():
    with pytest.raises(GroupError, match=r"groups must be strictly nested: \(4, 8\) followed by \(4, 16\)"):
        validate_groups([(2, 4), (4, 8), (4, 16)], R_q=16, R_c=64)
    with pytest.raises(GroupError, match=r"\(4, 8\) followed by \(8, 8\)"):
        validate_groups([(4, 8), (8, 8)], R_q=16, R_c=64)
    with pytest.raises(GroupError, match="strictly nested"):
        validate_groups([(8, 16), (4, 8)], R_q=16, R_c=64)


def test_last_group_exceeding_R_is_rejected():
    with pytest.raises(GroupError, match=r"\(32, 64\) exceeds the trained token counts R_q=16, R_c=64"):
        validate_groups([(1, 1), (32, 64)], R_q=16, R_c=64)
    with pytest.raises(GroupError, match="R_q=16, R_c=32"):
        validate_groups([(16, 64)], R_q=16, R_c=32)


@pytest.mark.parametrize(
    "groups, msg",
    [
        ([], "at least one"),
        ([(0, 1)], r"r_q >= 1 and r_c >= 1"),
        ([(1, -2)], r"r_q >= 1 and r_c >= 1"),
        ([(1.0, 2)], "must be an integer"),
        ([(True, 2)], "must be an integer, got bool"),
        ([(1, 2, 3)], r"groups\[0\] must be a pair"),
        ((16, 64), r"groups\[0\] must be a pair"),
        ("16,64", "sequence of"),
        (None, "sequence of"),
    ],
)
def test_malformed_groups(groups, msg):
    with pytest.raises(GroupError, match=msg):
        validate_groups(groups, R_q=16, R_c=64)


def test_bad_token_counts():
    with pytest.raises(GroupError, match="R_q=0"):
        validate_groups([(1, 1)], R_q=0, R_c=4)
    # R_c is checked too (not just refused later as "exceeds"): the message names the bad count
    for check in (lambda: validate_groups([(1, 1)], R_q=4, R_c=0), lambda: validate_budget((1, 1), R_q=4, R_c=-1)):
        with pytest.raises(GroupError, match="token counts must be >= 1"):
            check()


def test_group_error_is_a_value_error():
    assert issubclass(GroupError, ValueError)


def test_validate_budget():
    assert validate_budget((16, 64), R_q=16, R_c=64) == (16, 64)
    assert validate_budget([np.int32(2), 4], R_q=16, R_c=64) == (2, 4)
    with pytest.raises(GroupError, match=r"budget \(32, 64\) exceeds the trained token counts R_q=16, R_c=64"):
        validate_budget((32, 64), R_q=16, R_c=64)
    with pytest.raises(GroupError, match=r"budget \(1, 65\) exceeds"):
        validate_budget((1, 65), R_q=16, R_c=64)
    with pytest.raises(GroupError, match="r_q >= 1"):
        validate_budget((0, 4), R_q=16, R_c=64)
    with pytest.raises(GroupError, match="pair"):
        validate_budget(16, R_q=16, R_c=64)


def test_format_parse_roundtrip():
    assert format_budget((16, 64)) == "(16,64)"
    assert group_key((2, 4)) == "group_2x4"
    for b in DEFAULT_GROUPS:
        assert parse_budget(format_budget(b)) == b
    assert parse_budget("16,64") == (16, 64)
    assert parse_budget(" ( 2 , 4 ) ") == (2, 4)
    assert parse_budget("8x16") == (8, 16)


@pytest.mark.parametrize("text", ["16", "16,64,1", "a,b", "16;64", "-1,4", "0,4", "", "(16,64", "16,64)"])
def test_parse_budget_rejects_garbage(text):
    with pytest.raises(GroupError):
        parse_budget(text)


def test_run_config_uses_validate_groups():
    from metaembed.config import ConfigError, config_from_dict

    config_from_dict({"loss": {"groups": [[1, 1], [4, 8]]}})
    with pytest.raises(ConfigError, match="loss.groups: groups must be strictly nested"):
        config_from_dict({"loss": {"groups": [[1, 1], [1, 8]]}})


def test_numpy_and_torch_pairs_are_budgets():
    """A 1-D array or tensor of two ints is a pair: it was refused as "must be a pair (r_q, r_c), got array([2, 4])"."""
    import torch

    assert validate_budget(np.array([2, 4]), R_q=16, R_c=64) == (2, 4)
    assert validate_budget(torch.tensor([2, 4]), R_q=16, R_c=64) == (2, 4)
    assert validate_groups(np.array([[1, 1], [2, 4]]), R_q=16, R_c=64) == [(1, 1), (2, 4)]
    assert format_budget(np.array([16, 64])) == "(16,64)"
    with pytest.raises(GroupError, match="must be an integer, got float 2.0"):
        validate_budget(np.array([2.0, 4.0]), R_q=16, R_c=64)
    with pytest.raises(GroupError, match="must be an integer, got bool"):
        validate_budget(torch.tensor([True, True]), R_q=16, R_c=64)
    with pytest.raises(GroupError, match=r"must be a pair \(r_q, r_c\), got array\(\[1, 2, 3\]\)"):
        validate_budget(np.array([1, 2, 3]), R_q=16, R_c=64)
    with pytest.raises(GroupError, match="exceeds"):
        validate_budget(np.array([32, 64]), R_q=16, R_c=64)
