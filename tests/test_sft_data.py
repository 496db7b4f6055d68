"""SFT data (dsv3.posttrain): conversations -> tokens with assistant-only loss masks, JSONL reading, best-fit
packing, collation into isolated TrainBatches (labels and MTP targets never cross a sample), the resumable
sharded loader, the built-in data set, and a tiny model's per-sample loss packed = alone."""

import dataclasses
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

import dsv3
from dsv3.data import DataError, Tokenizer, train_tokenizer
from dsv3.inference.chat import ChatTemplate
from dsv3.inference.tool_calls import TOOL_CALLS_BEGIN, TOOL_OUTPUTS_END
from dsv3.posttrain.builtin_sft import arithmetic_conversations, builtin_conversations, stdlib_conversations
from dsv3.posttrain.packing import SFTLoader, collate, pack_best_fit, pack_capacity
from dsv3.posttrain.sft_data import SFTSample, encode_all, encode_conversation, read_jsonl
from dsv3.posttrain.tasks import ArithmeticTask
from dsv3.train.batch import IGNORE_INDEX
from dsv3.train.step import token_losses

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello, friend"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
             {"role": "assistant", "content": "It is sunny."}]
# the official V3 layout for plain conversations, as plain Jinja (tests/test_serve.py)
V3_LAYOUT = ("{{bos_token}}{% for m in messages %}{% if m['role'] == 'system' %}{{m['content']}}{% endif %}"
             "{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}{{'<｜User｜>' + m['content']}}"
             "{% elif m['role'] == 'assistant' %}{{'<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>'}}"
             "{% endif %}{% endfor %}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")
# a ChatML-style template: the newline after <|im_end|> belongs to the assistant turn
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("Hello friend, be brief. Goodbye. What does `json.dumps` do? "
                                           "Compute 12 + 34 = \\boxed{46}. Return the value.\n" * 20)
    train_tokenizer(root / "corpus", root / "tok", vocab_size=320, show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def plain(tok_dir):
    """Trained by dsv3: BOS / EOS are its only special tokens (the chat markers are text)."""
    return Tokenizer.load(tok_dir)


@pytest.fixture(scope="module")
def official(tok_dir):
    """With the chat markers as special tokens, as in DeepSeek-V3's tokenizer (and ChatML's for CHATML)."""
    tok = Tokenizer.load(tok_dir)
    tok.hf.add_special_tokens([USER, ASSISTANT, TOOL_CALLS_BEGIN, TOOL_OUTPUTS_END, "<|im_start|>", "<|im_end|>"])
    return tok


def spans(tok: Tokenizer, sample: SFTSample) -> list[tuple[bool, str]]:
    """The sample as (trained, text) runs."""
    runs: list[tuple[bool, list[int]]] = []
    for t, trained in zip(sample.tokens, sample.trained):
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(t)
        else:
            runs.append((trained, [t]))
    return [(trained, tok.decode(ids)) for trained, ids in runs]


# --- masks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer", ["plain", "official"])
def test_fallback_trains_assistant_turns_and_their_end(tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    template = ChatTemplate(tok)
    sample = encode_conversation(template, CHAT)
    assert sample.tokens == template.encode(CHAT, add_generation_prompt=False)
    assert spans(tok, sample) == [(False, f"{BOS}Be brief.{USER}Hi there{ASSISTANT}"), (True, f"Hello, friend{EOS}"),
                                  (False, f"{USER}Bye{ASSISTANT}"), (True, f"Goodbye{EOS}")]
    # a tool-calling turn, and the answer after the results (no <｜Assistant｜> there: the results' end is prompt)
    runs = spans(tok, encode_conversation(template, TOOL_CHAT))
    assert [trained for trained, _ in runs] == [False, True, False, True]
    assert runs[1][1].startswith(TOOL_CALLS_BEGIN) and runs[1][1].endswith(EOS)
    assert runs[2][1].endswith(TOOL_OUTPUTS_END) and runs[3][1] == f"It is sunny.{EOS}"

    everything = encode_conversation(template, CHAT, loss_on="all")
    assert everything.tokens == sample.tokens and all(everything.trained)
    with pytest.raises(ValueError, match="loss_on"):
        encode_conversation(template, CHAT, loss_on="prompt")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        encode_conversation(template, [{"role": "assistant", "content": "x"}])


def test_jinja_templates(official, plain):
    pytest.importorskip("jinja2")
    # the official layout through Jinja: the same sample as the fallback (markers are special tokens)
    jinja = ChatTemplate(official, V3_LAYOUT)
    assert encode_conversation(jinja, CHAT) == encode_conversation(ChatTemplate(official), CHAT)
    # the same layout with the markers as text (a dsv3-trained tokenizer): the spans still decode right
    assert spans(plain, encode_conversation(ChatTemplate(plain, V3_LAYOUT), CHAT))[1] == (True, f"Hello, friend{EOS}")
    chatml = ChatTemplate(official, CHATML)
    assert spans(official, encode_conversation(chatml, CHAT)) == [
        (False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "Hello, friend<|im_end|>\n"),
        (False, "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Goodbye<|im_end|>\n")]


def test_a_template_that_rewrites_earlier_turns_or_refuses_a_part_is_refused(official):
    pytest.importorskip("jinja2")
    # earlier assistant turns lose their content (as reasoning templates drop earlier thoughts)
    hides = CHATML.replace("{{ m['content'] }}", "{% if m['role'] != 'assistant' or loop.last %}"
                                                 "{{ m['content'] }}{% endif %}")
    with pytest.raises(ValueError, match=r"messages\[2\]"):
        encode_conversation(ChatTemplate(official, hides), CHAT)
    with pytest.raises(DataError, match=r"conversation 1: messages\[2\]"):
        encode_all(ChatTemplate(official, hides), [CHAT[:3], CHAT])
    short = "{% if messages|length < 3 %}{{ raise_exception('too short') }}{% endif %}" + CHATML
    with pytest.raises(ValueError, match=r"messages\[2\]: rendering .*too short"):
        encode_conversation(ChatTemplate(official, short), CHAT)
    samples, stats = encode_all(ChatTemplate(official, hides), [CHAT[:3], CHAT], skip_errors=True)
    assert len(samples) == stats.samples == 1 and stats.skipped == 1
    assert stats.tokens == len(samples[0]) and stats.trained_tokens == sum(samples[0].trained)


# --- JSONL ----------------------------------------------------------------------------------------------------


def test_read_jsonl(tmp_path, plain):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": CHAT}) + "\n\n"
                    + json.dumps({"prompt": "Hi there", "completion": "Hello, friend"}) + "\n"
                    + json.dumps({"messages": TOOL_CHAT, "tools": [{"type": "function", "function":
                                                                    {"name": "get_weather"}}]}) + "\n")
    conversations = list(read_jsonl(good))
    assert [c.source for c in conversations] == [f"{good}:1", f"{good}:3", f"{good}:4"]
    assert conversations[1].messages == [{"role": "user", "content": "Hi there"},
                                         {"role": "assistant", "content": "Hello, friend"}]
    assert conversations[2].tools and conversations[0].tools is None
    samples, stats = encode_all(ChatTemplate(plain), conversations)
    assert stats.samples == 3 and stats.tokens == sum(map(len, samples))
    assert 0 < stats.trained_tokens < stats.tokens and "3 samples" in str(stats)

    for n, (line, error) in enumerate([
        ("{not json", "not valid JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"text": "hello"}', "no 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
        ('{"prompt": "hi", "completion": 3}', "must be strings"),
        ('{"messages": "hi"}', "must be a list"),
    ]):
        bad = tmp_path / f"bad{n}.jsonl"
        bad.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"bad{n}.jsonl:2: .*{error}"):
            list(read_jsonl(bad))


# --- packing --------------------------------------------------------------------------------------------------


def make_sample(n: int, seed: int, prompt: int = 2) -> SFTSample:
    """``n`` distinct-looking tokens, the first ``prompt`` untrained."""
    g = random.Random(seed)
    return SFTSample([g.randrange(10, 4000) for _ in range(n)], [i >= prompt for i in range(n)])


def test_best_fit_decreasing():
    lengths = [6, 5, 4, 3, 2]
    packs, stats = pack_best_fit([make_sample(n, n, prompt=0) for n in lengths], capacity=10)
    assert [[len(s) for s in p] for p in packs] == [[6, 4], [5, 3, 2]]
    assert (stats.samples, stats.packs, stats.tokens, stats.fill) == (5, 2, 20, 1.0)


@pytest.mark.parametrize("overflow", ["split", "drop"])
def test_packing_keeps_every_sample_once(overflow):
    capacity = 64
    rng = random.Random(0)
    samples = [make_sample(rng.randint(3, 150), i) for i in range(400)]
    samples.append(SFTSample([5, 6, 7], [False] * 3))  # nothing to learn: left out
    packs, stats = pack_best_fit(samples, capacity, overflow)
    assert all(sum(map(len, p)) <= capacity for p in packs)
    long = [s for s in samples if len(s) > capacity]
    assert long and stats.samples == len(samples) and stats.untrained >= 1
    if overflow == "split":  # pieces of capacity tokens, each keeping its tokens' flags
        assert stats.split == len(long) and stats.dropped == 0
        expected = []
        for s in samples:
            expected += [(s.tokens[a:a + capacity], s.trained[a:a + capacity]) for a in range(0, len(s), capacity)]
    else:
        assert stats.dropped == len(long) and stats.split == 0
        expected = [(s.tokens, s.trained) for s in samples if len(s) <= capacity]
    expected = [e for e in expected if any(e[1][1:])]
    packed = [(s.tokens, s.trained) for p in packs for s in p]
    assert sorted(packed) == sorted(expected)
    assert stats.tokens == sum(len(t) for t, _ in packed) and stats.packs == len(packs)
    assert 0.9 < stats.fill <= 1 and stats.fill == stats.tokens / (len(packs) * capacity)
    again, _ = pack_best_fit(samples, capacity, overflow)
    assert [[s.tokens for s in p] for p in again] == [[s.tokens for s in p] for p in packs]


def test_packing_is_fast():
    rng = random.Random(0)
    shared = {n: SFTSample([1] * n, [True] * n) for n in range(2, 1501)}  # packing only reads samples
    samples = [shared[rng.randint(2, 1500)] for _ in range(100_000)]
    start = time.perf_counter()
    packs, stats = pack_best_fit(samples, 4097)
    assert time.perf_counter() - start < 2.0  # about 0.3 s: no quadratic search
    assert stats.fill > 0.99 and all(sum(map(len, p)) <= 4097 for p in packs)


# --- collation ------------------------------------------------------------------------------------------------


def expected_targets(pack: list[SFTSample], seq_len: int, k: int) -> list[int]:
    """Depth-k target of each position, from the samples alone: t_{j+k+1} of the position's own sample."""
    out = [IGNORE_INDEX] * seq_len
    at = 0
    for s in pack:
        for j in range(len(s)):
            if at + j < seq_len and j + k + 1 < len(s) and s.trained[j + k + 1]:
                out[at + j] = s.tokens[j + k + 1]
        at += len(s)
    return out


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_collate_never_crosses_a_sample(depth):
    seq_len = 20
    packs = [[make_sample(9, 1), make_sample(7, 2, prompt=3), make_sample(5, 3)],  # S + 1 tokens: full
             [make_sample(12, 4, prompt=5)],
             [make_sample(3, 5, prompt=1), make_sample(3, 6, prompt=1)]]
    assert sum(map(len, packs[0])) == pack_capacity(seq_len)
    batch = collate(packs, seq_len, depth, pad_id=2)
    assert batch.isolated and batch.tokens.shape == batch.labels.shape == batch.doc_ids.shape == (3, seq_len + depth)
    assert batch.depth == depth and batch.input_doc_ids.shape == (3, seq_len)
    for r, pack in enumerate(packs):
        flat = [t for s in pack for t in s.tokens]
        width = min(len(flat), seq_len + depth)
        assert batch.tokens[r, :width].tolist() == flat[:width]
        assert (batch.tokens[r, width:] == 2).all()
        # sample d has doc id d; the padding one of its own
        ids = [d for d, s in enumerate(pack) for _ in s.tokens][:seq_len + depth]
        assert batch.doc_ids[r, :len(ids)].tolist() == ids
        assert (batch.doc_ids[r, len(ids):] == len(pack)).all()
        assert (batch.labels[r, len(flat) - 1:] == IGNORE_INDEX).all()  # no label at or after the padding
        for k in range(depth + 1):
            assert batch.targets(k)[r].tolist() == expected_targets(pack, seq_len, k), (r, k)
    # the full row's last token (the window's token S) is the main head's last target
    assert batch.targets(0)[0, -1].item() == packs[0][-1].tokens[-1]
    with pytest.raises(ValueError, match="more than seq_len"):
        collate([[make_sample(seq_len + 2, 0)]], seq_len, depth, pad_id=2)


# --- the loader -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packs():
    rng = random.Random(1)
    packs, _ = pack_best_fit([make_sample(rng.randint(3, 30), i) for i in range(60)], pack_capacity(32))
    return packs


def test_loader_resumes_exactly(packs):
    make = lambda: SFTLoader(packs, 32, 3, pad_id=2, depth=1, seed=5)  # noqa: E731
    loader = make()
    assert loader.steps_per_epoch(6) == -(-len(packs) // 6)
    for _ in range(len(packs) // 3 + 2):  # into the second epoch
        next(loader)
    state = loader.state_dict()
    ahead = [next(loader) for _ in range(4)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint's serialisation
    for a, b in zip(ahead, [next(resumed) for _ in range(4)]):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.doc_ids, b.doc_ids)
    # a fresh epoch order per epoch, every pack once per epoch
    fresh = make()
    seen = [fresh._order(e).tolist() for e in range(2)]
    assert seen[0] != seen[1] and sorted(seen[0]) == list(range(len(packs)))
    with pytest.raises(ValueError, match="seed"):
        SFTLoader(packs, 32, 3, pad_id=2, depth=1, seed=6).load_state_dict(state)


def test_loader_shards_ranks(packs):
    one = SFTLoader(packs, 32, 4, pad_id=2, seed=3)
    ranks = [SFTLoader(packs, 32, 2, pad_id=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(len(packs)):  # several epochs
        whole = next(one)
        parts = [next(loader) for loader in ranks]
        assert torch.equal(whole.tokens, torch.cat([p.tokens for p in parts]))
        assert torch.equal(whole.labels, torch.cat([p.labels for p in parts]))
    # a state saved with 2 ranks resumes with 1 (the position counts global packs)
    one_again = SFTLoader(packs, 32, 4, pad_id=2, seed=3)
    one_again.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(one_again).tokens, next(one).tokens)


# --- the built-in data ----------------------------------------------------------------------------------------


def test_builtin_conversations(plain):
    stdlib = stdlib_conversations()
    assert len(stdlib) > 300 and stdlib == stdlib_conversations()
    questions = [c[0]["content"] for c in stdlib]
    assert sum("`textwrap.dedent`" in q for q in questions) == 1 and len(set(questions)) == len(questions)
    assert not any("`_" in q or "._" in q for q in questions)  # no private names
    assert max(len(c[1]["content"]) for c in stdlib) < 700
    task = ArithmeticTask()
    arithmetic = arithmetic_conversations(50, task)
    for conv, p in zip(arithmetic, task.problems(50)):
        assert conv == task.messages(p) + [{"role": "assistant", "content": task.solution(p)}]
        assert task.reward(p, conv[-1]["content"]) == 1.0
        a, op, b = p.prompt.removeprefix("Compute ").split(".")[0].split()
        assert not task.held_out(int(a), op, int(b))  # never a test problem
    mixed = builtin_conversations(n_arithmetic=50, seed=1)
    assert mixed == builtin_conversations(n_arithmetic=50, seed=1) != builtin_conversations(n_arithmetic=50, seed=2)
    assert sorted(map(json.dumps, mixed)) == sorted(map(json.dumps, stdlib + arithmetic))
    # every conversation encodes with a dsv3-trained tokenizer, and decodes back to its rendering
    template = ChatTemplate(plain)
    samples, stats = encode_all(template, mixed)
    assert stats.samples == len(mixed) and stats.skipped == 0
    assert plain.decode(samples[0].tokens) == template.render(mixed[0], add_generation_prompt=False)
    assert all(s.n_targets > 0 for s in samples)


def test_builtin_conversations_are_the_same_in_every_process():
    """A resumed run rebuilds the data in a new process: nothing may depend on memory addresses or hash seeds
    (a default printed as ``<function f at 0x7f...>`` once made a resume refuse its own checkpoint)."""
    code = ("import hashlib, json; from dsv3.posttrain.builtin_sft import stdlib_conversations; "
            "print(hashlib.sha256(json.dumps(stdlib_conversations()).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                              capture_output=True, text=True, check=True, timeout=120).stdout for seed in (1, 2)}
    assert len(digests) == 1
    assert not any(" at 0x" in c[1]["content"] for c in stdlib_conversations())


# --- a real model: packed = alone -----------------------------------------------------------------------------


def sample_losses(model, batch, doc: int, row: int = 0) -> torch.Tensor:
    """(1 + D,) summed cross-entropy of the main head and each MTP depth on sample ``doc`` of ``row``."""
    mine = torch.zeros_like(batch.doc_ids, dtype=torch.bool)
    mine[row] = batch.doc_ids[row] == doc
    only = dataclasses.replace(batch, labels=batch.labels.masked_fill(~mine, IGNORE_INDEX))
    out = model(batch.inputs, future_tokens=batch.future_tokens, doc_ids=batch.input_doc_ids, with_mtp=True)
    return torch.stack(token_losses([out.logits, *out.mtp_logits], only)), out.logits


@pytest.mark.usefixtures("one_thread")
def test_packed_sample_loss_equals_alone():
    config = dataclasses.replace(dsv3.preset("tiny"), num_nextn_predict_layers=2)
    model = dsv3.build_model(config, seed=0).eval()
    depth, seq_len = 2, 19
    a, b = make_sample(11, 7, prompt=4), make_sample(9, 8, prompt=3)  # 20 = S + 1 tokens: b ends the window
    packed = collate([[a, b]], seq_len, depth, pad_id=2)
    with torch.no_grad():
        for doc, (sample, at) in enumerate([(a, 0), (b, len(a))]):
            alone = collate([[sample]], seq_len, depth, pad_id=2)
            loss_packed, logits_packed = sample_losses(model, packed, doc)
            loss_alone, logits_alone = sample_losses(model, alone, 0)
            assert (loss_alone > 0).all()  # every depth has targets in the sample
            torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-5)
            n = min(len(sample), seq_len - at)
            torch.testing.assert_close(logits_packed[0, at:at + n], logits_alone[0, :n], rtol=1e-5, atol=1e-5)
