"""Helpers the pipelines share to keep a small model's answers grounded: split passages
into sentences, pick the sentences closest to a question, and check that a generated
text is supported by the text it cites.

No model calls here: the graphs embed the sentences with the embedder (one batched call)
and pass the vectors in. A module without `build_pipeline`, so discovery skips it.

Support is checked lexically (words, numbers, negation), by hand: the usual tool, an NLI
or cross-encoder model, is not among the models shipped for offline use here, and would
add a model call to every answer. It catches what a 135M model gets wrong most (made-up
numbers and addresses, flipped negations, loops, text from nowhere); it cannot catch a
wrong claim made of the passage's own words.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike

# Words that say nothing about support: a reply made only of these is not grounded.
_STOPWORDS = """a about after again all also am an and any are as at be because been before
    being but by can could did do does doing done for from get got had has have having he her
    here hers him his how i if in into is it its just let me more most my no not now of
    on once only or our ours out over please same she should so some such than thank
    thanks that the their them then there these they this those to too under until up us
    very was we were what when where which while who why will with would you your yours
    hi hello dear regards"""
STOPWORDS = frozenset(_STOPWORDS.split())
_WORD = re.compile(r"[a-z0-9$€£][a-z0-9$€£.,:/@_-]*[a-z0-9%]|[a-z0-9]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(*\[])|\n\s*\n|\n(?=\s*[-*>#]|\s{3})")
MAX_SENTENCE_CHARS = 400


def sentences(text: str) -> list[str]:
    """The sentences of a passage, each at most 400 characters; headings (Markdown's
    `#`, or a few words without a full stop) are left out."""
    out: list[str] = []
    for piece in _SENTENCE_END.split(text):
        piece = " ".join(piece.split())
        n = len(words(piece))
        if n < 3 or piece.startswith("#") or (n < 6 and not piece.endswith((".", "!", "?", ":"))):
            continue  # a heading, a rule or a fragment: nothing to quote or to check
        out.extend(
            piece[i : i + MAX_SENTENCE_CHARS] for i in range(0, len(piece), MAX_SENTENCE_CHARS)
        )
    return out


def words(text: str) -> list[str]:
    """Lower-cased word tokens, stopwords kept; trailing punctuation dropped."""
    return [w.lower().rstrip(".,:") for w in _WORD.findall(text)]


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 1}


def support(text: str, evidence: str) -> float:
    """The share of `text`'s content words that `evidence` contains (0 for empty text).
    A cheap test of grounding: a small model's unsupported claims use words the
    passages do not have."""
    said = content_words(text)
    if not said:
        return 0.0
    known = content_words(evidence)
    # Stems: "refunded" is supported by "refund", "deliveries" by "delivery".
    stems = {w[:5] for w in known}
    return sum(w in known or w[:5] in stems for w in said) / len(said)


_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_NEGATION = frozenset({"not", "no", "never", "cannot", "can't", "don't", "doesn't", "isn't"})


_ODD = re.compile(r"[_@/]|^www|^http")


def numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(text))


def supports(evidence: str, claim: str, min_support: float) -> bool:
    """Whether `evidence` backs `claim`: most of its content words are there, every
    number, address and URL in it is there, and it is not negated where the closest
    evidence sentence is not (a small model's favourite error: "No, return shipping is
    not free")."""
    if support(claim, evidence) < min_support or not numbers(claim) <= numbers(evidence):
        return False
    known = set(words(evidence))
    if any(_ODD.search(w) and w not in known for w in words(claim)) or "[" in claim:
        return False  # a made-up address, URL or placeholder ("[your_email_address]")
    if _NEGATION.isdisjoint(words(claim)):
        return True
    closest = max(sentences(evidence) or [evidence], key=lambda s: support(claim, s))
    return not _NEGATION.isdisjoint(words(closest))


def overlap(a: str, b: str) -> float:
    """Jaccard similarity of two texts' content words."""
    x, y = content_words(a), content_words(b)
    return len(x & y) / len(x | y) if x | y else 1.0


def is_repetitive(text: str) -> bool:
    """True when a few words make up most of the text (a small model's loop)."""
    tokens = words(text)
    if len(tokens) < 12:
        return False
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(trigrams)) < 0.6 * len(trigrams)


def ranked(vector: ArrayLike, vectors: ArrayLike) -> list[float]:
    """Cosine similarity of each of `vectors` to `vector` (all L2-normalised): lists or
    the encoders' arrays."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if not matrix.size:
        return []
    return [float(s) for s in matrix @ np.asarray(vector)]


def supported_sentences(
    text: str, question: str, evidence: str, min_support: float, most: int
) -> list[str]:
    """The sentences of `text` that `evidence` supports (see `supports`), at most `most`
    of them, those sharing most words with `question` first, kept in `text`'s order.
    Dropped: repeats, sentences that only echo the question, and an unfinished last
    sentence (cut off by max_tokens or a length bound)."""
    said = sentences(text)
    if (
        said
        and not said[-1].endswith((".", "!", "?"))
        and (len(said) > 1 or words(said[-1])[-1] in STOPWORDS)
    ):
        said = said[:-1]
    kept: list[tuple[int, str]] = []
    for i, sentence in enumerate(said):
        if is_repetitive(sentence) or overlap(sentence, question) >= 0.6:
            continue
        if any(overlap(sentence, other) >= 0.6 for _, other in kept):
            continue
        if supports(evidence, sentence, min_support):
            kept.append((i, sentence))
    asked = content_words(question)
    on_topic = [(i, s) for i, s in kept if content_words(s) & asked] or kept
    closest = sorted(on_topic, key=lambda k: -len(content_words(k[1]) & asked))
    return [sentence for _, sentence in sorted(closest[:most])]


def covers(text: str, sentence: str) -> bool:
    """Whether `text` states the gist of `sentence`: at least 40 % of its content words,
    and one of its numbers if it has any."""
    if support(sentence, text) < 0.4:
        return False
    wanted = numbers(sentence)
    return not wanted or bool(wanted & numbers(text))
