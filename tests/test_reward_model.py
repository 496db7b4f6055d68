"""The model-based reward (``--reward rm:PATH``): a checkpoint transformers writes for
DeepseekV3ForSequenceClassification scores like transformers does, batched with padding, conversation by
conversation."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsv3.data import train_tokenizer  # noqa: E402
from dsv3.posttrain.reward_model import RewardModelReward  # noqa: E402
from dsv3.posttrain.rewards import make_reward  # noqa: E402
from test_hf_parity import small_config  # noqa: E402


def classifier(out, num_labels: int = 1, seed: int = 0, pad_token_id: int = 0):
    """A random DeepseekV3ForSequenceClassification saved to ``out`` by transformers, routing biases varied."""
    config = transformers.DeepseekV3Config(**small_config(vocab_size=320).to_hf_dict(), num_labels=num_labels,
                                           pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForSequenceClassification(config).float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.3)
    model.save_pretrained(out)
    return model


def reward_model(root):
    """``root/rm``: a tokenizer trained by dsv3 and a random one-label classifier written by transformers."""
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("Compute 12 + 34. The answer is \\boxed{46}. Thank you, goodbye.\n" * 30)
    train_tokenizer(root / "corpus", root / "rm", vocab_size=320, show_progress=False)
    return root / "rm", classifier(root / "rm")


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    return reward_model(tmp_path_factory.mktemp("rm"))


def test_scores_are_transformers_scores_at_the_last_token(rm):
    path, theirs = rm
    reward = RewardModelReward(path, batch_size=3)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 320, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 1)]  # no pad id inside
    ours = reward.score_tokens(seqs)  # right-padded batches of 3 and 2
    with torch.no_grad():
        want = [theirs(torch.tensor([s])).logits[0, 0].item() for s in seqs]
    assert ours == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1e-3  # the scores tell the sequences apart


def test_padding_with_the_end_token_reads_the_score_before_it(rm, tmp_path):
    """DeepSeek-V3's tokenizer pads with EOS, which ends every assistant turn: transformers then reads the score
    at the last token that is not EOS, and so does dsv3."""
    path, _ = rm
    eos = 1
    theirs = classifier(tmp_path / "eos", pad_token_id=eos)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            (tmp_path / "eos" / name).write_bytes((path / name).read_bytes())
    reward = RewardModelReward(tmp_path / "eos")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(2, 320, (n,), generator=g).tolist() + [eos] for n in (6, 11)]
    with torch.no_grad():
        want = [theirs(torch.tensor([s])).logits[0, 0].item() for s in seqs]
        at_eos = [theirs.model(torch.tensor([s])).last_hidden_state[0, -1] @ theirs.score.weight[0] for s in seqs]
    assert reward.score_tokens(seqs) == pytest.approx(want, abs=1e-4)
    assert all(abs(a.item() - w) > 1e-4 for a, w in zip(at_eos, want))  # not the score at the EOS


def test_rm_spec_scores_each_conversation_with_the_model_s_template(rm):
    path, theirs = rm
    reward = make_reward(f"rm:{path}")
    assert isinstance(reward, RewardModelReward)
    prompts, completions = ["Compute 12 + 34."] * 2, ["\\boxed{46}", "I do not know."]
    got = reward(prompts, completions, [None, None])
    for p, c, score in zip(prompts, completions, got):
        tokens = reward.template.encode([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                        add_generation_prompt=False)
        with torch.no_grad():
            assert score == pytest.approx(theirs(torch.tensor([tokens])).logits[0, 0].item(), abs=1e-4)
    assert got[0] != got[1]


def test_what_is_not_a_reward_model_is_refused(rm, tmp_path):
    with pytest.raises(ValueError, match="not a reward model's directory"):
        make_reward(f"rm:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        make_reward(f"rm:{tmp_path / 'empty'}")
    path, _ = rm
    two = tmp_path / "two"
    classifier(two, num_labels=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            (two / name).write_bytes((path / name).read_bytes())
    with pytest.raises(ValueError, match="one label"):
        make_reward(f"rm:{two}")
