"""Training data: corpus -> tokenizer -> cached token file -> packed, resumable batches.

Typical use::

    tok = train_tokenizer(None, "runs/tok", vocab_size=4096)   # None: stdlib corpus
    train = load_or_build(tok, None, "train", "runs/cache")
    val = load_or_build(tok, None, "val", "runs/cache")
    loader = PackedLoader(train, seq_len=256, batch_size=8, fim_rate=0.1, seed=0)
    batch = next(loader)          # batch.inputs, batch.targets: (8, 256) int64
    state = loader.state_dict()   # store in the checkpoint; load_state_dict() resumes
    for vb in iter_eval_batches(val, seq_len=256, batch_size=8): ...
"""

from .corpus import VAL_FRACTION, DataError, Split, corpus_fingerprint, iter_documents, list_source_files, stdlib_root
from .fim import DEFAULT_FIM_RATE, FimPlan, FimTokens, apply_fim, fim_rearrange, invert_fim, plan_fim
from .loader import Batch, PackedLoader, PackedStream, iter_eval_batches
from .tokenizer import (
    BOS,
    DEFAULT_VOCAB_SIZE,
    EOS,
    FIM_BEGIN,
    FIM_END,
    FIM_HOLE,
    PAD,
    SPECIAL_TOKENS,
    Tokenizer,
    train_tokenizer,
)
from .tokens import TokenFile, load_or_build, open_token_file, token_dtype

__all__ = [
    "BOS", "EOS", "PAD", "FIM_BEGIN", "FIM_HOLE", "FIM_END", "SPECIAL_TOKENS",
    "DEFAULT_VOCAB_SIZE", "DEFAULT_FIM_RATE", "VAL_FRACTION",
    "DataError", "Split", "iter_documents", "list_source_files", "stdlib_root", "corpus_fingerprint",
    "Tokenizer", "train_tokenizer",
    "TokenFile", "load_or_build", "open_token_file", "token_dtype",
    "FimTokens", "FimPlan", "apply_fim", "fim_rearrange", "invert_fim", "plan_fim",
    "Batch", "PackedLoader", "PackedStream", "iter_eval_batches",
]
