"""A pipeline schedule on one rank, and the overlapped forward-backward pairs on two CUDA streams: the same
gradients as running the chunks one after the other, and as a plain forward-backward of the micro-batches."""

import pytest
import torch

import dsv3
from dsv3.pipeline import build_schedule
from dsv3.pipeline.executor import PipelineExecutor
from dsv3.pipeline.overlap import ChunkStreams, chunk_streams
from dsv3.pipeline.schedule import flat_actions
from dsv3.pipeline.stages import PipelineStage, split_layers
from dsv3.pipeline.weight_grad import WeightGradStore, defer_weight_gradients
from dsv3.train.batch import TrainBatch
from dsv3.train.step import cross_entropy_sum


def _setup(device: str, seq: int = 32, chunks: int = 4, micro: int = 1):
    cfg = dsv3.preset("tiny").replace(num_hidden_layers=4, num_nextn_predict_layers=0)
    model = dsv3.build_model(cfg, device=device, seed=0).train()
    store = WeightGradStore()
    defer_weight_gradients(model, store)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [TrainBatch.from_window(torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=device,
                                                    generator=gen), seq) for _ in range(chunks)]
    return model, store, batches


def _run(model, store, batches, name: str, streams: ChunkStreams | None) -> list[torch.Tensor]:
    sched = build_schedule(name, 1, len(batches))
    splits = split_layers(model.config, sched.n_model_stages)
    stages = {v: PipelineStage(model, sched.model_stage[v], sched.n_model_stages, splits[sched.model_stage[v]])
              for v in sched.stages_of(0)}
    n = sum(b.targets(0).numel() for b in batches)
    model.zero_grad(set_to_none=True)
    PipelineExecutor(sched, 0, stages, None, store, streams).run(
        batches, hidden=lambda m: None, loss_fn=lambda logits, b: cross_entropy_sum(logits[0], b.targets(0)) / n,
        with_mtp=False)
    return [p.grad.clone() for p in model.parameters()]


def _plain(model, batches) -> list[torch.Tensor]:
    n = sum(b.targets(0).numel() for b in batches)
    model.zero_grad(set_to_none=True)
    for b in batches:
        (cross_entropy_sum(model(b.inputs).logits, b.targets(0)) / n).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_streams_are_chosen_once_and_refused_where_they_cannot_run():
    assert chunk_streams("cpu", "auto") is None and chunk_streams("cpu", "off") is None
    with pytest.raises(ValueError, match="CUDA streams"):
        chunk_streams("cpu", "on")
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        chunk_streams("cpu", "yes")
    with pytest.raises(ValueError, match="CUDA streams"):
        ChunkStreams("cpu")


def test_the_setting_is_checked_where_it_is_given():
    from dsv3.config import ConfigError
    from dsv3.train import TrainConfig

    assert TrainConfig(pp=2, pp_schedule="dualpipev", pp_overlap=True).pp_overlap == "on"  # YAML's reading of on
    assert TrainConfig(pp_overlap=False).pp_overlap == "off"
    for bad in ({"pp_overlap": "on"}, {"pp": 2, "pp_schedule": "1f1b", "pp_overlap": "on"}):
        with pytest.raises(ConfigError, match="pp_overlap"):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="pp_overlap"):
        TrainConfig(pp_overlap="sometimes")


@pytest.mark.parametrize("name", ["dualpipev", "1f1b"])
def test_one_rank_schedule_gives_the_plain_gradients(name):
    """P = 1 (the bench's form): DualPipeV's two stages on one rank, its pairs and deferred weight gradients."""
    model, store, batches = _setup("cpu")
    reference = _plain(model, batches)
    for got, want in zip(_run(model, store, batches, name, None), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_overlapped_pairs_give_the_serial_gradients_on_two_streams():
    model, store, batches = _setup("cuda", seq=256, chunks=6, micro=2)
    serial = _run(model, store, batches, "dualpipev", None)
    streams = ChunkStreams("cuda")
    for _ in range(2):  # twice: the second run reuses the first's memory across streams
        overlapped = _run(model, store, batches, "dualpipev", streams)
        torch.cuda.synchronize()
        for got, want in zip(overlapped, serial):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    sched = build_schedule("dualpipev", 1, len(batches))
    pairs = [s for s in sched.steps[0] if len(flat_actions(s)) == 2]
    assert pairs
    for f, b in pairs:  # the two halves of every pair ran on different streams
        assert streams._of[(f.stage, f.microbatch)] != streams._of[(b.stage, b.microbatch)]
    for got, want in zip(serial, _plain(model, batches)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
