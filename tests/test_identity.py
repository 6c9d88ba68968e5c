"""What names a vector: keys change with everything that changes a vector, and 0.1's keys stay valid."""

import hashlib

from metaeol_edge.identity import CacheKey, derived_name, fit_key, key_digest, sha256_file, vector_source


def _old_digest(*parts: str) -> bytes:
    """0.1's cache key digest, written out: SHA-256 over length-prefixed UTF-8 parts, first 16 bytes."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)
    return h.digest()[:16]


def test_the_papers_keys_are_the_keys_0_1_wrote():
    key = CacheKey("sha", "template text", -1, True, "float32", 512, "A cat.")
    assert key.digest() == _old_digest("sha", "template text", "-1", "1", "float32", "512", "A cat.")


def test_the_cache_key_changes_with_everything_that_changes_a_vector():
    base = CacheKey("sha", "t", -1, True, "float32", 512, "s")
    changed = [
        CacheKey("sha2", "t", -1, True, "float32", 512, "s"),
        CacheKey("sha", "u", -1, True, "float32", 512, "s"),
        CacheKey("sha", "t", 5, True, "float32", 512, "s"),
        CacheKey("sha", "t", -1, False, "float32", 512, "s"),
        CacheKey("sha", "t", -1, True, "float16", 512, "s"),
        CacheKey("sha", "t", -1, True, "float32", 256, "s"),
        CacheKey("sha", "t", -1, True, "float32", 512, "s2"),
        CacheKey("sha", "t", -1, True, "float32", 512, "s", method="sentence-mean/1"),
    ]
    digests = {base.digest(), *(k.digest() for k in changed)}
    assert len(digests) == len(changed) + 1
    # Length prefixes: moving a character from one part to the next is another key.
    assert key_digest(["ab", "c"]) != key_digest(["a", "bc"])


def test_the_model_part_names_the_file_the_early_exit_copy_and_the_backend():
    assert vector_source("abc") == "abc"  # the engine on the whole file: as 0.1
    assert vector_source("abc", 28) == "abc:blocks28"  # as 0.1 wrote early-exit keys
    assert vector_source("abc", None, "naive") == "abc@naive"
    assert len({vector_source("abc"), vector_source("abc", 28), vector_source("abc", 28, "naive")}) == 3


def test_the_fit_key_changes_with_everything_that_changes_the_vectors():
    base = ("sha", ["t1", "t2"], 12, True, 512)
    key = fit_key(*base)
    for i, other in enumerate(["sha2", ["t1"], 13, False, 256]):
        changed = list(base)
        changed[i] = other
        assert fit_key(*changed) != key
    assert fit_key(*base, method="sentence-mean/1") != key
    assert fit_key(*base, method="") == key


def test_derived_names_and_file_hashes(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert derived_name(path, "0123456789abcdef", "blocks9") == "m.0123456789ab.blocks9.gguf"
