"""Node-limited routing: where the routing groups land on the expert-parallel ranks, and the reach counter."""

from __future__ import annotations

import pytest
import torch

from dsv3.train.node_limited import DispatchReach, ExpertPlacement


def report_layout(ranks_per_node: int = 8, ep: int = 64) -> ExpertPlacement:
    """DeepSeek-V3: 256 experts, 8 groups, 4 kept, 8 per token, EP 64 (report §2.1.2, §3.2)."""
    return ExpertPlacement(256, 8, 4, 8, tuple(range(ep)), ranks_per_node)


def test_the_report_layout_is_node_limited_to_four_nodes():
    p = report_layout()
    assert p.nodes == 8 and p.experts_per_rank == 4 and p.group_size == 32
    assert p.groups_on_one_node() and p.max_nodes_per_token() == 4
    assert [p.nodes_of_group(g) for g in range(8)] == [{g} for g in range(8)]
    p.check_node_limited()
    assert "a token reaches at most 4 node(s), each group on one node (node-limited)" in p.describe()


def test_layouts_whose_groups_span_nodes_are_refused_with_the_numbers():
    p = report_layout(ranks_per_node=4)  # 16 nodes of 16 experts: every group spans two
    assert not p.groups_on_one_node() and p.max_nodes_per_token() == 8
    with pytest.raises(ValueError, match=r"routing group of 32 experts .* a node holds 16 experts .*16 nodes"):
        p.check_node_limited()
    # more experts per node than a group: each node holds whole groups, still limited
    assert report_layout(ranks_per_node=16).groups_on_one_node()
    assert report_layout(ranks_per_node=16).max_nodes_per_token() == 4
    # one node: nothing to limit
    one = ExpertPlacement(16, 4, 2, 4, (4, 5, 6, 7), 8)
    assert one.nodes == 1 and one.max_nodes_per_token() == 1 and one.node_of_rank() == [0, 0, 0, 0]


def test_nodes_are_numbered_from_the_group_s_global_ranks():
    p = ExpertPlacement(16, 4, 2, 4, (8, 9, 10, 11), 2)  # the second EP group of a 16-rank job, 2 ranks per node
    assert p.node_of_rank() == [0, 0, 1, 1] and p.nodes == 2


def test_reach_counts_distinct_ranks_and_nodes_per_token():
    reach = DispatchReach([0, 0, 1, 1], torch.device("cpu"))
    reach.count(torch.tensor([[0, 0, 1, 1], [0, 1, 2, 3], [3, 3, 3, 3]]))  # (T, K) destination ranks
    assert reach.take().tolist() == [3.0, 2 + 4 + 1, 1 + 2 + 1]
    assert reach.take().tolist() == [0.0, 0.0, 0.0]
