"""Partitions of the conditioning space and the router (MSD)."""
import pytest
import torch

from gendistill.partition import (PartitionError, Router, balanced_kmeans, contiguous_partition,
                                  median_split_tree, partition_classes, random_partition)


def sizes(assignment, k):
    return sorted(assignment.count(i) for i in range(k))


def test_contiguous_ranges_are_equal_sized_and_consecutive():
    a = contiguous_partition(10, 4)
    assert a == sorted(a) and sizes(a, 4) == [2, 2, 3, 3]
    assert contiguous_partition(4, 4) == [0, 1, 2, 3]
    assert contiguous_partition(4, 1) == [0, 0, 0, 0]


def test_random_partition_is_seeded_and_balanced():
    a, b, c = random_partition(10, 4, 0), random_partition(10, 4, 0), random_partition(10, 4, 1)
    assert a == b and a != c
    assert sizes(a, 4) == sizes(contiguous_partition(10, 4), 4)


def test_balanced_kmeans_finds_clusters_and_keeps_parts_equal():
    g = torch.Generator().manual_seed(0)
    left = torch.randn(4, 3, generator=g) * 0.1 - 5
    right = torch.randn(4, 3, generator=g) * 0.1 + 5
    a = balanced_kmeans(torch.cat([left, right]), 2, seed=0)
    assert len(set(a[:4])) == 1 and len(set(a[4:])) == 1 and a[0] != a[4]
    # uneven clusters (6 vs 2): plain k-means would give 6/2, the balanced one 4/4
    uneven = torch.cat([torch.randn(6, 2, generator=g) * 0.1, torch.randn(2, 2, generator=g) + 9])
    b = balanced_kmeans(uneven, 2, seed=3)
    assert sizes(b, 2) == [4, 4] and b[6] == b[7]
    assert b == balanced_kmeans(uneven, 2, seed=3)


def test_too_many_students_or_an_empty_part_is_a_clear_error():
    with pytest.raises(PartitionError, match="5 students for 4 conditions"):
        contiguous_partition(4, 5)
    with pytest.raises(PartitionError, match="num_students must be >= 1"):
        partition_classes("random", 4, 0, seed=0)
    with pytest.raises(PartitionError, match="a student has no class"):
        Router.for_classes([0, 0, 2])
    with pytest.raises(PartitionError, match="power of 2"):
        median_split_tree(torch.randn(9, 4), 3)
    with pytest.raises(PartitionError, match="needs per-class features"):
        partition_classes("kmeans", 4, 2, seed=0)


def test_router_splits_a_mixed_batch_in_order():
    router = Router.for_classes(contiguous_partition(10, 4))
    labels = torch.tensor([9, 0, 5, 3, 3, 7])
    assert router(labels).tolist() == [3, 0, 2, 1, 1, 2]
    again = Router(router.state)  # JSON state round trip, as saved in the pipeline's config
    assert again(labels).tolist() == router(labels).tolist()
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 9\]"):
        router(torch.tensor([10]))


def test_prompt_router_is_balanced_and_routes_each_training_prompt_to_its_part():
    g = torch.Generator().manual_seed(0)
    pooled = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    router = Router.for_prompts(pooled, 4)
    parts = router(pooled)
    assert sorted(parts.bincount(minlength=4).tolist()) == [10, 10, 10, 10]
    # the same prompt embedding goes to the same student whatever batch it is in
    assert router(pooled[[7]]).item() == parts[7].item()
    assert Router(router.state)(pooled).tolist() == parts.tolist()


def test_prompts_that_no_cut_separates_are_an_error_not_an_empty_student():
    with pytest.raises(PartitionError, match="4 prompts project to the same point"):
        Router.for_prompts(torch.ones(4, 3), 2)
