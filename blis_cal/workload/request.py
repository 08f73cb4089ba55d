"""One generated request, and the deterministic prompt content (token ids or words) behind it.

A prompt is a chain of content segments `(key, length)`. Two prompts share a prefix exactly when they
start with the same segments, so the token ids (or words) of a segment depend only on its key and the
workload's `token_seed`: a prefix group's requests send identical leading tokens (prefix-cache hits on a
real server, the same block hashes in the simulator), and another seed gives fresh content (no cache
hits carried over from an earlier run on the same server).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

# Ids below this are special tokens in common vocabularies (<unk>, <s>, </s>, <pad>).
TOKEN_ID_FLOOR = 4

# Short common words, each one BPE token in typical English vocabularies (with a leading space).
WORDS: tuple[str, ...] = tuple(
    """the of and to in is was for on that with as by at from his her are be this have not but or had
    an they which one you were all we she there been their has more when who will would if no out so
    what up its about into than them can only other time new some could these two may first then do
    any like my now over such our man me even most made after also did many before must through back
    years where much your way well down should because each just those people how too little state
    good very make world still own see men work long get here between both life being under never day
    same another know while last might us great old year off come since against go came right used
    take three states himself few house use during without again place around however home small
    found thought went say part once high general upon school every don does got united left number
    course war until always away something fact though water less public put think almost hand enough
    far took head yet government system better set told nothing night end why called didn eyes find
    going look asked later knew point next city give group business young let room president side
    social given present several order national possible rather second face per among form important
    often things looking early white case john become large big need four within felt along children
    saw best church ever least power development light thing seemed family interest want members mind
    country area others done turned although open god service problem certain kind different thus
    began door help means sense whole matter perhaps itself york times law human line above name
    example action company hands local show whether five history gave today either act feet across""".split()  # noqa: SIM905
)


@lru_cache(maxsize=512)  # prefixes and accumulated history repeat; own tokens do not
def _segment(key: str, length: int, token_seed: int, high: int, floor: int) -> tuple[int, ...]:
    """`length` ids in [floor, high) for a segment key; the same arguments always give the same ids."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    rng = np.random.default_rng([token_seed, digest])
    return tuple(rng.integers(floor, high, size=length).tolist())


@dataclass(frozen=True)
class WorkloadRequest:
    request_id: int
    client_id: str
    tenant_id: str
    slo_class: str
    arrival_us: int  # scheduled, µs from the start of the run
    prefix_group: str
    prefix_length: int
    input_tokens: int  # suffix only (BLIS convention); the whole prompt is prefix_length + input_tokens
    output_tokens: int
    session_id: str
    round_index: int
    streaming: bool
    think_time_us: int  # the pause before this request (closed loop / later session rounds), else 0
    token_seed: int
    # The prompt as content segments (key, length): ("prefix:<group>", L), earlier rounds' segments plus
    # ("out:<id>", answer length) when the context accumulates, then ("req:<id>", own tokens).
    context: tuple[tuple[str, int], ...]
    model: str = ""

    @property
    def total_input_tokens(self) -> int:
        return self.prefix_length + self.input_tokens

    def token_ids(
        self,
        vocab_size: int,
        *,
        floor: int = TOKEN_ID_FLOOR,
        answers: Mapping[int, Sequence[int]] | None = None,
    ) -> list[int]:
        """The prompt as token ids in [floor, vocab_size): deterministic, identical for identical segments.

        `answers` (request id -> the ids a server generated) replace the synthetic ("out:<id>", k) segments:
        vLLM caches the KV of generated tokens too, so a chat that repeats the real answer hits it.
        """
        if vocab_size <= floor:
            raise ValueError(f"vocab_size {vocab_size} must exceed the id floor {floor}")
        ids: list[int] = []
        for key, length in self.context:
            real = _answer(key, answers)
            ids.extend(
                real if real is not None else _segment(key, length, self.token_seed, vocab_size, floor)
            )
        return ids

    def prompt_text(self, words: tuple[str, ...] = WORDS, *, answers: Mapping[int, str] | None = None) -> str:
        """The prompt as space-separated words, one per token: shared prefixes are byte-identical.
        `answers` (request id -> the text a server generated) replace the synthetic answer segments."""
        parts: list[str] = []
        for key, length in self.context:
            real = _answer(key, answers)
            if real is not None:
                parts.append(real)
            else:
                parts.extend(words[i] for i in _segment(key, length, self.token_seed, len(words), 0))
        return " ".join(parts)


def _answer(key: str, answers: Mapping[int, Any] | None) -> Any:
    """The recorded answer standing in for an ("out:<id>", k) segment, if any."""
    if not answers or not key.startswith("out:"):
        return None
    return answers.get(int(key[4:]))
