"""Ranking arithmetic of the evaluation: brute-force references with ties, a hand-built multi-caption case, and the
CyCLIP/RankCLIP retrieval bug (only every fifth rank filled) shown not to happen here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankclip_ds.evaluate.metrics import (
    best_positive_rank,
    classification_metrics,
    rank_of_target,
    recall_at_k,
    retrieval_metrics,
)
from rankclip_ds.evaluate.zeroshot import zeroshot_classifier_from_embeddings


def brute_rank(row: list[float], positives: set[int]) -> int:
    """Position of the first positive in the order (score descending, then index ascending)."""
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    return next(pos for pos, j in enumerate(order) if j in positives)


def tied_embeddings(n: int, d: int, seed: int) -> torch.Tensor:
    """Small integer vectors: many exactly equal scores (and some duplicate rows)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).float()


def test_tie_rule_is_index_order():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    # order: 1, 2, 4 (tied at 3, by index), then 0, then 3
    assert [int(rank_of_target(scores, torch.tensor([t]))) for t in range(5)] == [3, 0, 1, 4, 2]
    # several positives: the best placed one counts
    assert int(best_positive_rank(scores, torch.tensor([[True, False, False, False, True]]))) == 2


def test_rank_equals_stable_sort_position():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 4, (50, 9), generator=g).float()
    targets = torch.randint(0, 9, (50,), generator=g)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    expected = (order == targets[:, None]).float().argmax(dim=1)
    assert torch.equal(rank_of_target(scores, targets), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_brute_force_with_ties(seed):
    n, c, d = 97, 11, 3
    images, classifier = tied_embeddings(n, d, seed), tied_embeddings(c, d, seed + 100)
    labels = torch.randint(0, c - 1, (n,), generator=torch.Generator().manual_seed(seed))  # class c-1: no samples
    got = classification_metrics(images, classifier, labels, ks=(1, 5), block_size=7)
    scores = (images @ classifier.T).tolist()
    ranks = [brute_rank(scores[i], {int(labels[i])}) for i in range(n)]
    assert sum(1 for i in range(n) for j in range(c) for k in range(j + 1, c) if scores[i][j] == scores[i][k]) > 50
    assert got["top1"] == pytest.approx(sum(r < 1 for r in ranks) / n, abs=1e-12)
    assert got["top5"] == pytest.approx(sum(r < 5 for r in ranks) / n, abs=1e-12)
    per_class = []
    for cls in range(c):
        members = [i for i in range(n) if labels[i] == cls]
        entry = got["per_class"][cls]
        assert entry["index"] == cls and entry["count"] == len(members)
        if not members:
            assert entry["top1"] is None and entry["top5"] is None
            continue
        top1 = sum(ranks[i] < 1 for i in members) / len(members)
        assert entry["top1"] == pytest.approx(top1, abs=1e-12)
        assert entry["top5"] == pytest.approx(sum(ranks[i] < 5 for i in members) / len(members), abs=1e-12)
        per_class.append(top1)
    assert got["mean_per_class"] == pytest.approx(sum(per_class) / len(per_class), abs=1e-12)
    assert (got["num_samples"], got["num_classes"]) == (n, c)


def test_classification_is_deterministic_across_block_sizes_and_devices_of_work():
    images, classifier = tied_embeddings(64, 4, 5), tied_embeddings(10, 4, 6)
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    results = [classification_metrics(images, classifier, labels, block_size=b) for b in (1, 5, 64, 1000)]
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_brute_force_with_ties_and_several_captions(seed):
    g = torch.Generator().manual_seed(seed)
    num_images, d = 23, 3
    per_image = torch.randint(1, 5, (num_images,), generator=g)  # 1..4 captions per image
    owner = torch.repeat_interleave(torch.arange(num_images), per_image)
    owner = owner[torch.randperm(owner.numel(), generator=g)]  # captions in any order
    images, texts = tied_embeddings(num_images, d, seed), tied_embeddings(owner.numel(), d, seed + 7)
    got = retrieval_metrics(images, texts, owner, ks=(1, 5, 10), block_size=4)
    s = (images @ texts.T).tolist()  # (N, M)
    i2t = [brute_rank(s[i], {j for j in range(owner.numel()) if owner[j] == i}) for i in range(num_images)]
    st = (texts @ images.T).tolist()  # (M, N)
    t2i = [brute_rank(st[j], {int(owner[j])}) for j in range(owner.numel())]
    for k in (1, 5, 10):
        assert got[f"image_to_text_R@{k}"] == pytest.approx(sum(r < k for r in i2t) / num_images, abs=1e-12)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(sum(r < k for r in t2i) / len(t2i), abs=1e-12)
    assert got["num_images"] == num_images and got["num_captions"] == owner.numel()


def test_multi_caption_retrieval_by_hand():
    e = torch.eye(3)
    images = e  # image i points along axis i
    # captions: image 0 owns c0 (points at image 1: wrong) and c1 (points at image 0: right);
    # image 1 owns c2 (points at image 2: wrong); image 2 owns c3, c4 (both point at image 2: right).
    texts = torch.stack([e[1], e[0], e[2], e[2] * 0.9 + e[0] * 0.1, e[2] * 0.8 + e[1] * 0.2])
    owner = torch.tensor([0, 0, 1, 2, 2])
    got = retrieval_metrics(images, texts, owner, ks=(1, 2, 3))
    # image 0: scores c0..c4 = 0, 1, 0, .1, 0 → c1 (its own) first → R@1 hit
    # image 1: scores = 1, 0, 0, 0, .2 → c0 (image 0's), c4, then ties at 0 by index: c1, c2 → c2 at rank 3
    # image 2: scores = 0, 0, 1, .9, .8 → c2 (image 1's) first, c3 (its own) second → hit at R@2
    assert got["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert got["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert got["image_to_text_R@3"] == pytest.approx(2 / 3)  # image 1's only caption is 4th
    # caption queries: c0 → image 1 first (wrong; image 0 second by index), c1 → image 0 (right),
    # c2 → image 2 (wrong; image 0 then 1 tie at 0 → image 1 third), c3 → image 2 (right), c4 → image 2 (right)
    assert got["text_to_image_R@1"] == pytest.approx(3 / 5)
    assert got["text_to_image_R@2"] == pytest.approx(4 / 5)
    assert got["text_to_image_R@3"] == pytest.approx(5 / 5)


def cyclip_style_image_to_text(image_rows: torch.Tensor, texts: torch.Tensor, ks, per_image: int = 5) -> dict:
    """What the CyCLIP/RankCLIP evaluation reports as text retrieval (written here to show the defect).

    Its inputs are one image row per caption (each image repeated ``per_image`` times). It loops over every fifth
    row only, stores that query's rank, and leaves the other four entries of the rank array at their initial zero,
    which counts as a hit at every k: four fifths of the queries are "correct" whatever the model does.
    """
    ranks = torch.zeros(image_rows.shape[0], dtype=torch.float64)
    for q in range(0, image_rows.shape[0], per_image):
        order = torch.argsort(image_rows[q] @ texts.T, descending=True)
        own = (order >= q) & (order < q + per_image)
        ranks[q] = float(own.nonzero()[0, 0])
    return {k: float((ranks < k).double().mean()) for k in ks}


def test_every_fifth_rank_bug_does_not_inflate_our_text_retrieval():
    torch.manual_seed(0)
    num_images, per_image = 20, 5
    images = torch.eye(num_images)  # (N, N) image i along axis i
    owner = torch.arange(num_images).repeat_interleave(per_image)  # (5N,) caption j belongs to image j // 5
    # every caption points *away* from its image: its own image is the worst match, truth is R@k = 0 for k ≤ 10
    texts = F.normalize(-images[owner] + 0.01 * torch.rand(owner.numel(), num_images), dim=-1)
    ks = (1, 5, 10)
    buggy = cyclip_style_image_to_text(images[owner], texts, ks, per_image)
    ours = retrieval_metrics(images, texts, owner, ks=ks)
    assert all(buggy[k] >= 0.8 for k in ks)  # the defect: ≥ 80 % for a model that is always wrong
    assert all(ours[f"image_to_text_R@{k}"] == 0.0 for k in ks)
    assert all(ours[f"text_to_image_R@{k}"] == 0.0 for k in ks)

    # and on unrelated random embeddings ours stays at chance while the bug still reports ≥ 80 %
    texts = F.normalize(torch.randn(owner.numel(), num_images), dim=-1)
    buggy = cyclip_style_image_to_text(images[owner], texts, ks, per_image)
    ours = retrieval_metrics(images, texts, owner, ks=ks)
    assert buggy[1] >= 0.8
    assert ours["image_to_text_R@1"] <= 0.3


def test_recall_and_errors():
    assert recall_at_k(torch.tensor([0, 1, 5, 9]), (1, 5, 10)) == {1: 0.25, 5: 0.5, 10: 1.0}
    with pytest.raises(ValueError, match="empty"):
        recall_at_k(torch.zeros(0, dtype=torch.long), (1,))
    with pytest.raises(ValueError, match="non-finite"):
        rank_of_target(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no positive"):
        best_positive_rank(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        rank_of_target(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="2 class names for a classifier of 3"):
        classification_metrics(torch.eye(3), torch.eye(3), torch.arange(3), classnames=["a", "b"])


def test_metrics_check_their_input_after_scoring():
    """classification_metrics and retrieval_metrics score first (no host read) and check the counts of their one read
    back: labels outside the classes, non-finite scores, captions of no image, no captions at all."""
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) .*got min 0 max 3"):
        classification_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) .*got min -1 max 2"):
        classification_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"^1 query rows have non-finite"):
        classification_metrics(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]), torch.eye(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"text_to_image must index the 2 images, got range \[0, 2\]"):
        retrieval_metrics(torch.eye(2), torch.eye(2)[[0, 1, 1]], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(torch.eye(2), torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs images and captions, got 2 images and 0 captions"):
        retrieval_metrics(torch.eye(2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_zeroshot_classifier_is_the_normalised_mean_of_normalised_prompts():
    prompts = torch.randn(3 * 4, 5, generator=torch.Generator().manual_seed(0))  # 3 classes × 4 templates
    got = zeroshot_classifier_from_embeddings(prompts, 3)
    expected = F.normalize(F.normalize(prompts, dim=-1).view(3, 4, 5).mean(dim=1), dim=-1)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="same number of templates for every class"):
        zeroshot_classifier_from_embeddings(prompts, 5)


def test_top_k_at_least_num_classes_is_one():
    got = classification_metrics(torch.randn(10, 4), torch.randn(3, 4), torch.randint(0, 3, (10,)), ks=(1, 5))
    assert got["top5"] == 1.0
