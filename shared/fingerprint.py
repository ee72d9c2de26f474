"""Tokenizer fingerprints: two peers must mean the same thing by every token id before speculating."""
from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fingerprint:
    num_tokens: int
    sha256: str

    def short(self) -> str:
        return f"{self.num_tokens} tokens, sha256 {self.sha256[:12]}"


# tokenizer -> (its size and special tokens then, fingerprint): the edge's CLI checks the draft's tokenizer before the
# weights load and EdgeClient again after (0.2-0.5 s each); a tokenizer that gained tokens or specials is hashed anew
_MEMO: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, str], Fingerprint]]" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> Fingerprint:  # a transformers PreTrainedTokenizerBase
    """Hash of the full vocabulary (token -> id, added tokens included) and the special tokens."""
    try:
        stamp = (len(tokenizer), repr(sorted(tokenizer.special_tokens_map.items())))
        memo = _MEMO.get(tokenizer)
    except TypeError:  # not weakly referable or not hashable: hashed every time
        stamp, memo = None, None
    if memo is not None and memo[0] == stamp:
        return memo[1]
    fingerprint = _fingerprint(tokenizer)
    if stamp is not None:
        _MEMO[tokenizer] = (stamp, fingerprint)
    return fingerprint


def _fingerprint(tokenizer) -> Fingerprint:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return Fingerprint(len(vocab), h.hexdigest())


def tokenizer_mismatch(draft: str, mine: Fingerprint, target: str, server: str, theirs: Fingerprint) -> str | None:
    """Why the draft `draft` cannot speak to the cloud at `server` serving `target` (None: it can): their tokenizers
    differ. Said by the edge before any generation (EdgeClient.connect), and by the CLI as soon as the draft's
    tokenizer and the cloud's Info are both known, before the draft's weights load."""
    if theirs == mine:
        return None
    return (f"tokenizer mismatch: the draft {draft!r} has {mine.short()}, the cloud's target {target!r} at {server} "
            f"has {theirs.short()}; draft and target must share a tokenizer (a draft of the target's own family, e.g. "
            "Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct)")


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The stop set: the generation config's end-of-sequence ids plus the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
        if v is not None:
            ids.add(int(v))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def session_logits_width(draft_width: int, target_width: int, tokens: int) -> int:
    """The logits width a speculative session speaks: the target's. A draft whose width differs joins when every id
    the shared tokenizer makes (`tokens` of them) lies inside both widths: the ids past that are padding rows
    (Qwen2.5-0.5B pads to 151,936, Qwen2.5-7B to 152,064, one tokenizer of 151,665). The draft's logits are then cut
    or padded with -inf to the target's width (shared/backend.py). ValueError when a real token would be lost."""
    if draft_width == target_width:
        return target_width
    if tokens > min(draft_width, target_width):
        raise ValueError(f"vocabulary width mismatch: draft logits have {draft_width} entries, target {target_width}, "
                         f"and the tokenizer has {tokens} tokens, so some real token has no logit on one side")
    return target_width
