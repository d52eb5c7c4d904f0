"""Partitions of the conditioning space among K students, and the router (MSD, DESIGN.md §5).

Classes: ``contiguous`` ranges (the paper's choice), ``kmeans`` (balanced k-means on per-class
features) or ``random`` (a seeded shuffle cut into equal parts). Prompts: a balanced split of the
pooled text embedding by median cuts along principal axes, K = 2^d parts (the paper split by
quadrants; plain k-means gives very uneven parts).

A ``Router`` maps a batch of conditions to student indices. Its state is plain JSON (saved in
the MSD pipeline's config): for classes the assignment class -> student; for prompts the tree of
cuts (an axis and a threshold per node, heap order), so that a training prompt is routed at
inference to exactly the student that trained on it. No training code here: the pipelines
import the router.
"""
from __future__ import annotations

import math

import torch

PARTITIONS = ("contiguous", "kmeans", "random")


class PartitionError(ValueError):
    pass


def check_parts(num_conditions: int, num_students: int) -> None:
    if num_students < 1:
        raise PartitionError(f"num_students must be >= 1, got {num_students}")
    if num_students > num_conditions:
        raise PartitionError(f"{num_students} students for {num_conditions} conditions: every "
                             f"student needs at least one condition")


def contiguous_partition(num_classes: int, num_students: int) -> list[int]:
    """Class c -> floor(c K / C): K ranges of consecutive classes, sizes differing by <= 1."""
    check_parts(num_classes, num_students)
    return [c * num_students // num_classes for c in range(num_classes)]


def random_partition(num_classes: int, num_students: int, seed: int) -> list[int]:
    """The contiguous cut of a seeded random order of the classes."""
    check_parts(num_classes, num_students)
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = contiguous_partition(num_classes, num_students)
    assignment = [0] * num_classes
    for rank, c in enumerate(order):
        assignment[c] = parts[rank]
    return assignment


def part_sizes(n: int, k: int) -> list[int]:
    return [(i + 1) * n // k - i * n // k for i in range(k)]


def balanced_kmeans(features: torch.Tensor, num_parts: int, seed: int,
                    iterations: int = 50) -> list[int]:
    """k-means whose parts have the sizes of the contiguous split: each step assigns points to
    centres by an optimal transport (Hungarian on centres repeated by their size), then moves
    each centre to its points' mean. Initialised with k-means++ from ``seed``."""
    from scipy.optimize import linear_sum_assignment

    x = features.double()
    n = x.shape[0]
    check_parts(n, num_parts)
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    for _ in range(1, num_parts):  # k-means++: far points are likelier centres
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        centres.append(x[torch.multinomial(probs, 1, generator=g)].squeeze(0))
    centres = torch.stack(centres)
    slots = torch.tensor([k for k, size in enumerate(part_sizes(n, num_parts))
                          for _ in range(size)])
    assignment = None
    for _ in range(iterations):
        cost = torch.cdist(x, centres[slots]) ** 2
        rows, cols = linear_sum_assignment(cost.numpy())
        new = slots[torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]]
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centres = torch.stack([x[assignment == k].mean(0) for k in range(num_parts)])
    return assignment.tolist()


def median_split_tree(embeddings: torch.Tensor, num_parts: int) -> tuple[list, list]:
    """Balanced split of embeddings into K = 2^d parts: each node cuts its points at the median
    of their projection on their first principal axis. Returns (axes, thresholds) in heap
    order, K - 1 nodes."""
    depth = round(math.log2(num_parts)) if num_parts >= 1 else -1
    if num_parts < 1 or 2 ** depth != num_parts:
        raise PartitionError(f"prompt partitions split in halves: num_students must be a "
                             f"power of 2, got {num_parts}")
    check_parts(embeddings.shape[0], num_parts)
    x = embeddings.double()
    axes = [None] * (num_parts - 1)
    thresholds = [0.0] * (num_parts - 1)
    members = {0: torch.arange(x.shape[0])}
    for node in range(num_parts - 1):
        pts = x[members[node]]
        if len(pts) < 2:
            raise PartitionError(f"too few distinct prompts ({x.shape[0]}) for "
                                 f"{num_parts} students")
        centred = pts - pts.mean(0)
        axis = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        proj = pts @ axis
        # the cut halfway between the two middle projections: half the points on each side
        ordered = proj.sort().values
        half = len(proj) // 2
        threshold = float((ordered[half - 1] + ordered[half]) / 2)
        axes[node], thresholds[node] = axis.tolist(), threshold
        left = proj <= threshold
        if left.all():  # the middle projections tie: no cut separates these prompts
            raise PartitionError(f"{len(pts)} prompts project to the same point: too few "
                                 f"distinct prompts for {num_parts} students")
        members[2 * node + 1] = members[node][left]
        members[2 * node + 2] = members[node][~left]
    return axes, thresholds


class Router:
    """condition -> student index, batched. ``state`` is JSON: ``{"kind": "class",
    "assignment": [...]}`` or ``{"kind": "text", "axes": [...], "thresholds": [...]}``."""

    def __init__(self, state: dict):
        kind = state.get("kind")
        if kind == "class":
            self.assignment = torch.as_tensor(state["assignment"], dtype=torch.long)
            self.num_students = int(self.assignment.max()) + 1
        elif kind == "text":
            self.axes = torch.as_tensor(state["axes"], dtype=torch.float64)
            self.thresholds = torch.as_tensor(state["thresholds"], dtype=torch.float64)
            self.num_students = len(state["thresholds"]) + 1
        elif kind == "single":
            self.num_students = 1
        else:
            raise PartitionError(f"unknown router kind {kind!r}")
        self.kind, self.state = kind, state
        sizes = self.num_students
        if kind == "class" and set(self.assignment.tolist()) != set(range(sizes)):
            raise PartitionError(f"router: a student has no class (assignment "
                                 f"{self.assignment.tolist()})")

    @classmethod
    def for_classes(cls, assignment: list[int]) -> "Router":
        return cls({"kind": "class", "assignment": [int(a) for a in assignment]})

    @classmethod
    def for_prompts(cls, pooled: torch.Tensor, num_students: int) -> "Router":
        axes, thresholds = median_split_tree(pooled, num_students)
        return cls({"kind": "text", "axes": axes, "thresholds": thresholds})

    def __call__(self, cond: torch.Tensor) -> torch.Tensor:
        """Class labels (B,) or pooled prompt embeddings (B, D) -> student indices (B,)."""
        if self.kind == "single":
            return torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        if self.kind == "class":
            labels = cond.long()
            if labels.min() < 0 or labels.max() >= len(self.assignment):
                raise ValueError(f"router: class labels must be in [0, "
                                 f"{len(self.assignment) - 1}]")
            return self.assignment.to(cond.device)[labels]
        node = torch.zeros(cond.shape[0], dtype=torch.long)
        x = cond.detach().double().cpu()
        for _ in range(round(math.log2(self.num_students))):
            right = (x * self.axes[node]).sum(1) > self.thresholds[node]
            node = 2 * node + 1 + right.long()
        return (node - (self.num_students - 1)).to(cond.device)


def class_features(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of the rows of ``x`` (features, or the data itself), (C, D)."""
    feats = x.flatten(1).double()
    return torch.stack([feats[labels == c].mean(0) for c in range(num_classes)])


def partition_classes(kind: str, num_classes: int, num_students: int, seed: int,
                      features: torch.Tensor | None = None) -> Router:
    """The class router of ``kind``; ``kmeans`` needs per-class features (C, D)."""
    if kind == "contiguous":
        return Router.for_classes(contiguous_partition(num_classes, num_students))
    if kind == "random":
        return Router.for_classes(random_partition(num_classes, num_students, seed))
    if kind == "kmeans":
        if features is None:
            raise PartitionError("partition=kmeans needs per-class features")
        return Router.for_classes(balanced_kmeans(features, num_students, seed))
    raise PartitionError(f"partition must be one of {', '.join(PARTITIONS)}, got {kind!r}")
