"""Pipeline schedules (report §3.2.1, Table 2): generated from the algorithms, replayed on a clock."""

import pytest

from dsv3.pipeline import Action, Costs, Deadlock, build_schedule, check_complete, flat_actions, simulate, table2_bubble

CASES = [("1f1b", 2, 3), ("1f1b", 4, 8), ("1f1b", 4, 2), ("dualpipev", 2, 4), ("dualpipev", 4, 8),
         ("dualpipev", 4, 10), ("dualpipev", 8, 16), ("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 4, 12),
         ("dualpipe", 8, 16), ("dualpipe", 8, 20)]


@pytest.mark.parametrize("name, ranks, chunks", CASES)
def test_every_chunk_runs_once_and_the_schedule_never_deadlocks(name, ranks, chunks):
    s = build_schedule(name, ranks, chunks)
    check_complete(s)
    simulate(s, Costs(F=1, B=2, W=1, p2p=0.1))


@pytest.mark.parametrize("name, ranks, chunks", [c for c in CASES if c[2] >= 2 * c[1] or c[0] == "1f1b"])
@pytest.mark.parametrize("costs", [Costs(F=1, B=2, W=1), Costs(F=2, B=3, W=1), Costs(F=1.5, B=2.5, W=1)])
def test_simulated_bubble_is_table2(name, ranks, chunks, costs):
    """Replayed without overlap gain (F&B = F + B) and with a forward as long as an input-gradient backward
    (F = B - W, the formula's tacit assumption), each schedule's bubble is the report's Table 2 formula:
    1F1B (PP-1)(F+B); DualPipe and DualPipeV (PP/2-1)(F&B+B-3W), PP = stages (2 x ranks for DualPipeV)."""
    s = build_schedule(name, ranks, chunks)
    stages = {"1f1b": ranks, "dualpipe": ranks, "dualpipev": 2 * ranks}[name]
    t = simulate(s, costs)
    assert t.bubble == pytest.approx(table2_bubble(name, stages, costs))
    # and every rank does the same work: the whole step's chunks over the ranks
    work = (costs.F + costs.B) * sum(len(path) for path in s.paths)
    assert t.busy(0) == pytest.approx(work / ranks)


def test_the_formula_is_an_approximation_when_forward_and_input_backward_differ():
    s = build_schedule("dualpipe", 8, 16)
    costs = Costs(F=1, B=2.5, W=1.2)  # I = 1.3 > F: the zero-bubble W chunks fill less than the formula counts
    assert simulate(s, costs).bubble < table2_bubble("dualpipe", 8, costs)


def test_dualpipe_layouts():
    v = build_schedule("dualpipev", 4, 8)
    assert v.stages_of(0) == [0, 7] and v.stages_of(3) == [3, 4]  # the V: first and last stage on rank 0
    assert v.paths[0] == tuple(range(8))
    d = build_schedule("dualpipe", 4, 8)
    assert d.model_stage == (0, 1, 2, 3, 0, 1, 2, 3)
    assert [sorted(d.model_stage[x] for x in d.stages_of(r)) for r in range(4)] == [[0, 3], [1, 2], [1, 2], [0, 3]]
    assert d.paths[0] == (0, 1, 2, 3) and d.paths[7] == (4, 5, 6, 7)  # half enter at rank 0, half at rank 3
    assert [d.rank_of[x] for x in d.paths[7]] == [3, 2, 1, 0]


def test_dualpipe_phases_follow_the_reference():
    """Rank 0 of DualPipe with 8 ranks (half rank 0 of 4): phase 1 is six forwards of its first direction, phase 2
    one forward of each direction, then zero-bubble I/W with forwards; the middle rank (3) starts its main phase
    with an un-overlapped F then B, as the reference does to shrink the bubble."""
    d = build_schedule("dualpipe", 8, 16)
    head = d.steps[0][:8]
    assert [a.kind for a in head[:6]] == ["F"] * 6 and all(a.stage == 0 for a in head[:6])
    assert (head[6].kind, head[6].stage, head[7].kind, head[7].stage) == ("F", 0, "F", 15)
    rank3 = d.steps[3]
    step3_end = 2 * 0 + 2 * 4  # phase 1 has (4-3-1)*2 = 0 steps, phase 2 has 2 * 4, phase 3 none
    assert [x.kind for x in rank3[step3_end:step3_end + 2]] == ["F", "B"]
    assert isinstance(rank3[step3_end + 2], tuple)  # then overlapped pairs
    kinds = [a.kind for step in d.steps[0] for a in flat_actions(step)]
    assert kinds.count("I") == kinds.count("W") > 0  # zero-bubble halves pair up


def test_counts_the_schedules_cannot_take_are_errors_naming_the_numbers():
    with pytest.raises(ValueError, match=r"at least 2 x pipeline ranks = 8, got 6"):
        build_schedule("dualpipev", 4, 6)
    with pytest.raises(ValueError, match="even number of micro-batches"):
        build_schedule("dualpipe", 4, 9)
    with pytest.raises(ValueError, match="even number of pipeline ranks, got 3"):
        build_schedule("dualpipe", 3, 6)
    with pytest.raises(ValueError, match="must be one of"):
        build_schedule("gpipe", 2, 2)


def test_a_broken_schedule_is_reported_as_a_deadlock():
    s = build_schedule("1f1b", 2, 2)
    swapped = list(s.steps[1])
    swapped[0], swapped[1] = Action("B", 1, 0), swapped[0]  # backward before its forward
    broken = type(s)(s.name, s.n_ranks, s.n_microbatches, s.rank_of, s.model_stage, s.paths,
                     (s.steps[0], tuple(swapped)))
    with pytest.raises(Deadlock):
        simulate(broken)


@pytest.mark.parametrize("name, kept_everything", [("1f1b", False), ("dualpipev", False), ("dualpipe", True)])
def test_a_pipeline_rank_builds_only_its_stages_initialised_as_in_the_whole_model(name, kept_everything):
    """What a rank holds is built on the meta device and allocated alone; every tensor it holds has the whole
    model's initial values (each tensor's generator is seeded by its name, not by what was built before it)."""
    import torch

    import dsv3
    from dsv3.train.parallel import Distributed, ParallelDims
    from dsv3.train.pipeline_parallel import stage_pruner

    config = dsv3.preset("tiny")
    full = dsv3.build_model(config, seed=3).state_dict()
    held = set()
    for rank in range(2):
        env = Distributed(ParallelDims(dp=1, pp=2, launched=True), rank, torch.device("cpu"))
        part = dsv3.build_model(config, seed=3, transform=stage_pruner(config, env, name)).state_dict()
        assert all(torch.equal(v, full[k]) for k, v in part.items())
        assert (len(part) == len(full)) == kept_everything
        held |= set(part)
    assert held == set(full)
    assert not torch.equal(full["layers.1.mlp.experts.gate_up_proj"][0], full["layers.1.mlp.experts.gate_up_proj"][1])
    assert not torch.equal(dsv3.build_model(config, seed=4).state_dict()["embed_tokens.weight"], full["embed_tokens.weight"])
