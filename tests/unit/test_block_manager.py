"""BlockManager: exact block ids, reference counts, eviction order and integrity."""

import pytest

from gpu_engine.block_manager import BlockManager, hash_block, hash_token_blocks


@pytest.fixture
def bm():
    m = BlockManager(num_blocks=6, block_size=4)
    yield m
    m.check_integrity()


def test_allocates_in_free_list_order_and_frees_to_the_back(bm):
    assert bm.allocate(2) == [0, 1]
    assert bm.allocate(3) == [2, 3, 4]
    assert bm.num_free_blocks == 1
    bm.free([0, 1])  # released tail first: 1 then 0
    assert bm.allocate(3) == [5, 1, 0]
    assert bm.num_free_blocks == 0


def test_allocation_that_does_not_fit_returns_none_and_takes_nothing(bm):
    assert bm.allocate(4) == [0, 1, 2, 3]
    assert bm.allocate(3) is None
    assert bm.num_free_blocks == 2
    assert bm.allocate(2) == [4, 5]


def test_share_counts_references_and_free_releases_at_zero(bm):
    blocks = bm.allocate(2)
    bm.share(blocks)
    assert [bm.ref_count(b) for b in blocks] == [2, 2]
    bm.free(blocks)
    assert [bm.ref_count(b) for b in blocks] == [1, 1]
    assert bm.num_free_blocks == 4
    bm.free(blocks)
    assert bm.num_free_blocks == 6


def test_misuse_raises(bm):
    [b] = bm.allocate(1)
    bm.free([b])
    with pytest.raises(RuntimeError, match="double free"):
        bm.free([b])
    with pytest.raises(ValueError, match="unknown block id 99"):
        bm.free([99])
    with pytest.raises(RuntimeError, match="not in use"):
        bm.share([b])
    with pytest.raises(RuntimeError, match="not in use"):
        bm.register(b, b"x")


def test_hashes_chain_on_the_parent():
    tokens = list(range(10))
    hashes = hash_token_blocks(tokens, 4)
    assert len(hashes) == 2  # the partial third block is not hashed
    assert hashes[0] == hash_block(b"", [0, 1, 2, 3])
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    assert hash_token_blocks([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != hashes[1]  # same block, other parent
    assert hash_token_blocks(tokens, 4, parent=hashes[0], start_block=1) == hashes[1:]


def test_prefix_hit_reuses_blocks_and_counts_hits(bm):
    h = hash_token_blocks(list(range(12)), 4)
    a = bm.allocate(3)
    for block, hb in zip(a, h):
        bm.register(block, hb)
    assert bm.take_events() == [("stored", hb) for hb in h]
    got = bm.acquire_prefix(h[:2] + [b"other"])
    assert got == a[:2]
    assert [bm.ref_count(b) for b in a] == [2, 2, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (3, 2)
    assert bm.cached_prefix_blocks(h) == 3


def test_cached_blocks_are_evicted_lru_only_when_free_list_is_empty(bm):
    h = hash_token_blocks(list(range(16)), 4)
    seq_a = bm.allocate(2)  # [0, 1]
    seq_b = bm.allocate(2)  # [2, 3]
    for block, hb in zip(seq_a + seq_b, h):
        bm.register(block, hb)
    bm.free(seq_a)  # cached, LRU order: 1, 0 (tail first)
    bm.free(seq_b)  # then 3, 2
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    assert bm.allocate(2) == [4, 5]  # never-used blocks first
    assert bm.num_cached_blocks == 4
    bm.take_events()
    assert bm.allocate(3) == [1, 0, 3]  # then the least recently freed cached blocks
    assert bm.take_events() == [("removed", h[1]), ("removed", h[0]), ("removed", h[3])]
    assert bm.cached_prefix_blocks(h) == 0
    assert bm.cached_prefix_blocks(h[2:]) == 1  # block 2 still caches the third hash


def test_a_hit_on_a_cached_block_takes_it_off_the_eviction_list(bm):
    h = hash_token_blocks(list(range(8)), 4)
    blocks = bm.allocate(2)
    for block, hb in zip(blocks, h):
        bm.register(block, hb)
    bm.free(blocks)
    assert bm.acquire_prefix(h[:1]) == [blocks[0]]
    assert bm.ref_count(blocks[0]) == 1
    assert bm.num_cached_blocks == 1
    assert bm.allocate(5) == [2, 3, 4, 5, blocks[1]]
    assert bm.allocate(1) is None


def test_duplicate_content_keeps_the_first_block(bm):
    [hb] = hash_token_blocks([1, 2, 3, 4], 4)
    a, b = bm.allocate(2)
    bm.register(a, hb)
    bm.register(b, hb)
    bm.free([a, b])
    assert bm.num_cached_blocks == 1  # b held no named content and went to the free list
    assert bm.acquire_prefix([hb]) == [a]


def test_reset_prefix_cache_frees_cached_blocks(bm):
    hs = hash_token_blocks(list(range(8)), 4)
    blocks = bm.allocate(2)
    for block, hb in zip(blocks, hs):
        bm.register(block, hb)
    bm.free(blocks)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    assert bm.acquire_prefix(hs) == []


def test_prefix_caching_off_never_matches():
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    [hb] = hash_token_blocks([1, 2, 3, 4], 4)
    [b] = bm.allocate(1)
    bm.register(b, hb)
    bm.free([b])
    assert bm.acquire_prefix([hb]) == []
    assert bm.num_cached_blocks == 0
    bm.check_integrity()


def test_integrity_check_catches_corruption(bm):
    bm.allocate(2)
    bm._free.append(0)  # block 0 is in use and on the free list
    with pytest.raises(AssertionError, match="accounting"):
        bm.check_integrity()
    bm._free.pop()
