"""Prefix caching (SGLang's radix cache, on by default there): the KV of prompt prefixes that earlier requests
computed stays on the replica, so a new request with the same prefix prefills only the rest.

Prefixes are cut into blocks, each named by a key that identifies the whole prefix up to and including it (a
chained hash), so the cache is a radix tree stored flat: key -> (parent key, tokens). Keys come from the trace:
- Mooncake `hash_ids`: each id names one 512-token block of the prompt, already chained by the trace's producer
  (equal ids = the same prefix up to that block);
- prompt text: the text cut into PROMPT_BLOCK_CHARS-character blocks, each key the hash of the text up to its end;
  a block stands for its share of the request's prompt tokens (tokens per character of that prompt);
- neither: no keys, the request never hits (and the cache changes nothing).

One cache per replica, in tokens: at most the replica's KV capacity. Eviction is LRU over leaves: a lookup or an
insert touches a path leaf first and root last, so every node is more recent than its descendants and the least
recently used node is always a leaf (evicting it never strands a cached descendant). Cached KV that running
requests also hold is counted once in the cache and again in the request (the replica's KV accounting is
unchanged): a conservative simplification of SGLang's shared, reference-counted blocks.

A hit is capped at the prompt length minus one token: the last prompt token is always computed (its logits give
the first output token), as in SGLang.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

MOONCAKE_BLOCK_TOKENS = 512  # Mooncake's hash_ids name 512-token blocks
PROMPT_BLOCK_CHARS = 256     # text blocks: about 64 tokens of English


def keys_from_hash_ids(hash_ids, prompt_tokens: int) -> tuple[tuple, tuple]:
    """(keys, tokens per key) of a Mooncake request: one key per hash id, 512 tokens each (the last block holds
    what is left of the prompt)."""
    keys, sizes = [], []
    left = int(prompt_tokens)
    for h in hash_ids:
        if left <= 0:
            break
        keys.append(("h", int(h)))
        sizes.append(min(MOONCAKE_BLOCK_TOKENS, left))
        left -= MOONCAKE_BLOCK_TOKENS
    return tuple(keys), tuple(sizes)


def keys_from_text(text: str, prompt_tokens: int) -> tuple[tuple, tuple]:
    """(keys, tokens per key) of a prompt given as text: whole PROMPT_BLOCK_CHARS-character blocks, each key a
    hash of the text up to its end (chained), each block worth its share of the prompt's tokens."""
    if not text or prompt_tokens < 1:
        return (), ()
    per_char = prompt_tokens / len(text)
    keys, sizes = [], []
    h = hashlib.blake2b(digest_size=8)
    for end in range(PROMPT_BLOCK_CHARS, len(text) + 1, PROMPT_BLOCK_CHARS):
        h.update(text[end - PROMPT_BLOCK_CHARS:end].encode("utf-8", "surrogatepass"))
        keys.append(("t", h.copy().digest()))
        sizes.append(max(1, int(round(PROMPT_BLOCK_CHARS * per_char))))
    return tuple(keys), tuple(sizes)


class PrefixCache:
    """One replica's cache of prefix blocks (key -> tokens), LRU over leaves, capacity in tokens."""

    def __init__(self, capacity_tokens: int):
        self.capacity = int(capacity_tokens)
        self.nodes: OrderedDict = OrderedDict()  # key -> [parent key, tokens, children]; oldest first
        self.tokens = 0
        self.lookups = 0           # requests looked up (with keys)
        self.prompt_tokens = 0     # their prompt tokens
        self.hit_tokens = 0        # prompt tokens served from the cache
        self.evicted_tokens = 0

    def match(self, keys: tuple, sizes: tuple, prompt_tokens: int) -> int:
        """Prompt tokens of the longest cached prefix (at most prompt_tokens - 1); touches the matched path."""
        n, hit = 0, 0
        nodes = self.nodes
        for k, s in zip(keys, sizes, strict=True):
            if k not in nodes:
                break
            n += 1
            hit += s
        for k in reversed(keys[:n]):  # leaf first, root last: ancestors stay more recent than descendants
            nodes.move_to_end(k)
        hit = min(hit, prompt_tokens - 1)
        self.lookups += 1
        self.prompt_tokens += prompt_tokens
        self.hit_tokens += hit
        return hit

    def peek(self, keys: tuple, sizes: tuple) -> int:
        """Tokens of the longest cached prefix, without touching anything (the prefix-aware router's view)."""
        hit = 0
        for k, s in zip(keys, sizes, strict=True):
            if k not in self.nodes:
                break
            hit += s
        return hit

    def insert(self, keys: tuple, sizes: tuple) -> None:
        """Cache a computed prefix (all its blocks), evicting least recently used leaves to make room."""
        nodes = self.nodes
        parent = None
        new = []
        for k, s in zip(keys, sizes, strict=True):
            if k not in nodes:
                if s > self.capacity:
                    break
                nodes[k] = [parent, s, 0]
                if parent is not None:
                    nodes[parent][2] += 1
                self.tokens += s
                new.append(k)
            parent = k
        path = [k for k in keys if k in nodes]
        for k in reversed(path):
            nodes.move_to_end(k)
        protect = set(path)
        while self.tokens > self.capacity:
            victim = next((k for k, v in nodes.items() if v[2] == 0 and k not in protect), None)
            if victim is None:
                victim = next(iter(nodes))  # only the new path is left: drop its oldest (deepest) block
            self._evict(victim)

    def _evict(self, key) -> None:
        parent, size, children = self.nodes.pop(key)
        self.tokens -= size
        self.evicted_tokens += size
        if parent is not None and parent in self.nodes:
            self.nodes[parent][2] -= 1

    def stats(self) -> dict:
        rate = self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return {"lookups": self.lookups, "prompt_tokens": self.prompt_tokens, "hit_tokens": self.hit_tokens,
                "hit_rate": round(rate, 6), "cached_tokens": self.tokens, "evicted_tokens": self.evicted_tokens}


def offline_shared_tokens(requests) -> tuple[int, int]:
    """Exact count, in arrival order with an unbounded cache: prompt tokens whose block was computed by an
    earlier request (the longest earlier-seen prefix, capped at prompt - 1), and all prompt tokens. `requests`:
    (keys, sizes, prompt_tokens) triples. What any LRU cache's hits are bounded by."""
    seen: set = set()
    hit = total = 0
    for keys, sizes, prompt in requests:
        h = 0
        for k, s in zip(keys, sizes, strict=True):
            if k not in seen:
                break
            h += s
        hit += min(h, prompt - 1)
        total += prompt
        seen.update(keys)
    return hit, total
