"""Converting a checkpoint many shards large holds about one shard plus the largest tensor, measured in a fresh
process (`conversion_memory_worker`), not assumed."""

from .helpers import run_memory_worker


def test_conversion_memory_is_bounded_by_a_shard_not_by_the_model(tmp_path):
    """A float16 checkpoint of 48 MiB converted to float32 shards of 8 MB: the peak anonymous memory (RssAnon,
    sampled from /proc) above the start of the conversion stays within two shards plus the largest tensor (one shard
    of cast tensors, and its serialized copy at most), where casting the model at once would take 96 MiB. glibc's
    allocator is told to return large blocks at once (MALLOC_MMAP_THRESHOLD_), so freed memory does not count."""
    record = run_memory_worker("tests.conversion_memory_worker", tmp_path)
    assert record["weights_equal"]
    assert record["checkpoint_bytes"] >= 6 * record["shard_bytes"] and record["shards"] >= 12, record
    bound = 2 * record["shard_bytes"] + record["largest_tensor_bytes"]
    assert record["converting_anon_increase"] <= bound, record
