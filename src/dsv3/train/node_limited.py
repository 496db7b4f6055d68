"""Node-limited routing on the expert-parallel layout (report §2.1.2, "Node-Limited Routing").

The report bounds the nodes a token's copies travel to: each token goes to at most M = 4 nodes, chosen by the
sum of the best affinities of the experts on each node. With its layout that is the group-limited routing the
model already does (``n_group`` = 8 groups of 32 experts, ``topk_group`` = 4 kept): expert parallelism hands each
rank a contiguous block of experts, so when a node's ranks hold whole routing groups, a token that keeps
``topk_group`` groups reaches at most ``topk_group`` nodes. :class:`ExpertPlacement` says where the groups land
for a run's layout; ``--node-limited`` makes "every group on one node" a requirement checked at start (a
``ConfigError`` naming the numbers), and the trainer records how many ranks and nodes the tokens actually reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """The routed experts of one MoE layer over an expert-parallel group of ranks, and the nodes those are on."""

    n_experts: int
    n_group: int
    topk_group: int
    top_k: int
    ep_ranks: tuple[int, ...]
    """Global ranks of the expert-parallel group, in expert order (rank i holds the i-th block of experts)."""
    ranks_per_node: int
    """Consecutive global ranks sharing a node (torchrun's LOCAL_WORLD_SIZE on a real cluster)."""

    @property
    def ep(self) -> int:
        return len(self.ep_ranks)

    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.ep

    @property
    def group_size(self) -> int:
        return self.n_experts // self.n_group

    def node_of_rank(self) -> list[int]:
        """Per expert-parallel rank, its node numbered from 0 within the group."""
        nodes = [r // self.ranks_per_node for r in self.ep_ranks]
        first = {n: i for i, n in enumerate(dict.fromkeys(nodes))}
        return [first[n] for n in nodes]

    @property
    def nodes(self) -> int:
        return len(set(self.node_of_rank()))

    def nodes_of_group(self, g: int) -> set[int]:
        """The nodes holding routing group ``g``'s experts."""
        node = self.node_of_rank()
        first, last = g * self.group_size, (g + 1) * self.group_size - 1
        return {node[r] for r in range(first // self.experts_per_rank, last // self.experts_per_rank + 1)}

    def groups_on_one_node(self) -> bool:
        return all(len(self.nodes_of_group(g)) == 1 for g in range(self.n_group))

    def max_nodes_per_token(self) -> int:
        """The most nodes one token's ``top_k`` copies can reach: those of its ``topk_group`` widest groups."""
        spans = sorted((len(self.nodes_of_group(g)) for g in range(self.n_group)), reverse=True)
        return min(sum(spans[: self.topk_group]), self.top_k, self.nodes)

    def check_node_limited(self) -> None:
        """ValueError, naming the numbers, unless every routing group lies on the ranks of one node."""
        if self.groups_on_one_node():
            return
        per_node = self.experts_per_rank * min(self.ranks_per_node, self.ep)
        raise ValueError(
            f"a routing group of {self.group_size} experts (n_routed_experts {self.n_experts} / n_group "
            f"{self.n_group}) must lie on one node, but a node holds {per_node} experts ({self.ranks_per_node} "
            f"ranks per node x {self.experts_per_rank}; {self.nodes} nodes): the node count (ep / ranks per node) "
            f"must divide n_group (the report: 256 experts, 8 groups, EP 64 over 8 nodes of 8)")

    def describe(self) -> str:
        return (f"{self.n_experts} routed experts over {self.ep} ranks ({self.experts_per_rank} each) on "
                f"{self.nodes} node(s) of {min(self.ranks_per_node, self.ep)} rank(s); {self.n_group} routing "
                f"group(s), {self.topk_group} kept: a token reaches at most {self.max_nodes_per_token()} node(s)"
                + (", each group on one node (node-limited)" if self.groups_on_one_node() else ""))


class DispatchReach:
    """Counts, on the device, how many ranks and nodes the tokens' copies go to (tokens, rank sum, node sum),
    until :meth:`take` reads and zeroes them."""

    def __init__(self, node_of_rank: list[int], device: torch.device):
        self.node_of_rank = torch.tensor(node_of_rank, device=device)
        self.n_nodes = max(node_of_rank) + 1
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def count(self, rank_of_copy: torch.Tensor) -> None:
        """``rank_of_copy`` (T, K): the expert-parallel rank each copy of each token goes to."""
        t = rank_of_copy.shape[0]
        ranks = torch.zeros(t, len(self.node_of_rank), dtype=torch.bool, device=rank_of_copy.device)
        nodes = torch.zeros(t, self.n_nodes, dtype=torch.bool, device=rank_of_copy.device)
        ranks.scatter_(1, rank_of_copy, True)
        nodes.scatter_(1, self.node_of_rank[rank_of_copy], True)
        self.totals[0] += t
        self.totals[1] += ranks.sum()
        self.totals[2] += nodes.sum()

    def take(self) -> torch.Tensor:
        out = self.totals.clone()
        self.totals.zero_()
        return out
