"""Graded relevance and ranking consistency: NDCG@k, mAP, Spearman, Kendall tau-b, modality gap, alignment and
uniformity against brute-force Python loops written here (with ties on both sides) and against scipy and sklearn;
shared-fact relevance; ``relevance_eval`` on a tiny model and shards with ``.json`` facts; the CLI; 2 ranks = 1."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import average_precision_score, ndcg_score
from test_eval_datasets import COLOURS, make_images, write_shards
from test_eval_end_to_end import TINY

from conftest import clean_launcher_env, run_ranks
from rankclip_ds.config import load_config
from rankclip_ds.data.transforms import build_image_transform
from rankclip_ds.evaluate import (
    alignment,
    average_precision,
    kendall_tau_b,
    modality_gap,
    ndcg_at_k,
    open_eval_data,
    relevance_eval,
    relevance_metrics,
    relevance_ranking,
    shared_fact_relevance,
    spearman,
    uniformity,
)
from rankclip_ds.export import save_export
from rankclip_ds.model import build_model, build_tokenizer

# ---------------------------------------------------------------- brute force: explicit loops, no shared helper


def bf_order(s: list[float]) -> list[int]:
    """Candidates by score, highest first, equal scores by index, lowest first."""
    return sorted(range(len(s)), key=lambda j: (-s[j], j))


def bf_ndcg(s: list[float], r: list[float], k: int) -> float | None:
    order, k = bf_order(s), min(k, len(s))
    dcg = sum(r[order[i]] / math.log2(i + 2) for i in range(k))
    ideal = sorted(r, reverse=True)
    idcg = sum(ideal[i] / math.log2(i + 2) for i in range(k))
    return dcg / idcg if idcg > 0 else None


def bf_ap(s: list[float], r: list[float]) -> float | None:
    found, total = 0, 0.0
    for i, j in enumerate(bf_order(s)):
        if r[j] > 0:
            found += 1
            total += found / (i + 1)
    return total / found if found else None


def bf_average_ranks(x: list[float]) -> list[float]:
    return [1 + sum(a < b for a in x) + (sum(a == b for a in x) - 1) / 2 for b in x]


def bf_spearman(x: list[float], y: list[float]) -> float | None:
    if len(set(x)) == 1 or len(set(y)) == 1:
        return None
    rx, ry = bf_average_ranks(x), bf_average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


def bf_kendall(x: list[float], y: list[float]) -> float | None:
    """tau-b = (P − Q) / sqrt((P + Q + T)(P + Q + U)), T / U: pairs tied in x only / in y only."""
    p = q = t = u = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                t += 1
            elif dy == 0:
                u += 1
            elif (dx > 0) == (dy > 0):
                p += 1
            else:
                q += 1
    if p + q + t == 0 or p + q + u == 0:
        return None
    return (p - q) / math.sqrt((p + q + t) * (p + q + u))


def bf_mean(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def bf_rows(scores: torch.Tensor, relevance: torch.Tensor, exclude_self: bool):
    """Rows as Python lists, the query's own column left out when asked."""
    for q, (s, r) in enumerate(zip(scores.tolist(), relevance.tolist(), strict=True)):
        if exclude_self:
            s, r = [v for j, v in enumerate(s) if j != q], [v for j, v in enumerate(r) if j != q]
        yield s, r


def assert_close_or_none(got, expected, tol=1e-9):
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=tol)


# ---------------------------------------------------------------- the arithmetic


def tied_case(seed: int, q: int = 9, k: int = 9, dim: int = 3):
    """Integer embeddings (exact integer scores, many ties) and integer relevance with a constant row, an all-zero
    row and a row with a single relevant candidate."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randint(-2, 3, (q, dim), generator=g).float()
    cand = torch.randint(-2, 3, (k, dim), generator=g).float()
    rel = torch.randint(0, 4, (q, k), generator=g).float()
    rel[1] = 2.0  # constant: correlation undefined, NDCG = 1, AP = 1
    rel[2] = 0.0  # nothing relevant: NDCG and AP undefined, correlation undefined
    rel[3] = 0.0
    rel[3, 4] = 3.0  # one relevant candidate
    return query, cand, rel


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_matches_brute_force_with_ties(seed, exclude_self):
    query, cand, rel = tied_case(seed)
    if exclude_self:
        cand = query
    ks = (1, 3, 5, 50)
    got = relevance_ranking(query, cand, rel, ks=ks, exclude_self=exclude_self, block_size=4)  # 3 blocks
    rows = list(bf_rows(query @ cand.T, rel, exclude_self))
    assert len(set((query @ cand.T).flatten().tolist())) < 20  # the scores are full of ties
    for name, per_query in (
        ("ap", [bf_ap(s, r) for s, r in rows]),
        ("spearman", [bf_spearman(s, r) for s, r in rows]),
        ("kendall", [bf_kendall(s, r) for s, r in rows]),
    ):
        for q, expected in enumerate(per_query):
            value = getattr(got, name)[q].item()
            assert_close_or_none(None if math.isnan(value) else value, expected)
    for j, k in enumerate(ks):
        for q, (s, r) in enumerate(rows):
            value = got.ndcg[j, q].item()
            assert_close_or_none(None if math.isnan(value) else value, bf_ndcg(s, r, k))
    summary = relevance_metrics(query, cand, rel, ks=ks, exclude_self=exclude_self, block_size=4)
    assert summary["map"] == pytest.approx(bf_mean([bf_ap(s, r) for s, r in rows]), abs=1e-12)
    assert summary["spearman"] == pytest.approx(bf_mean([bf_spearman(s, r) for s, r in rows]), abs=1e-12)
    assert summary["kendall"] == pytest.approx(bf_mean([bf_kendall(s, r) for s, r in rows]), abs=1e-12)
    for k in ks:
        assert summary[f"ndcg@{k}"] == pytest.approx(bf_mean([bf_ndcg(s, r, k) for s, r in rows]), abs=1e-12)
    assert summary["num_queries"] == 9
    assert summary["num_no_relevant"] == sum(bf_ap(s, r) is None for s, r in rows) >= 1
    assert summary["num_constant"] == sum(bf_kendall(s, r) is None for s, r in rows) >= 2


def test_tie_rule_and_hand_values():
    # candidates 0 and 2 tie on score; the tie rule puts 0 first, so the relevant one (2) is second
    scores = torch.tensor([[0.5, 0.1, 0.5, 0.3]])
    rel = torch.tensor([[0.0, 1.0, 2.0, 0.0]])
    assert ndcg_at_k(scores, rel, [1, 2]).flatten().tolist() == pytest.approx(
        [0.0, (2 / math.log2(3)) / (2 + 1 / math.log2(3))]
    )
    assert average_precision(scores, rel).item() == pytest.approx((1 / 2 + 2 / 4) / 2)  # relevant at places 2 and 4
    # correlations see equal scores as a tie, not as an order: swapping the tied pair changes nothing
    swapped = torch.tensor([[0.5, 0.1, 0.5, 0.3]])[:, [2, 1, 0, 3]]
    rel_swapped = rel[:, [2, 1, 0, 3]]
    assert spearman(scores, rel).item() == pytest.approx(spearman(swapped, rel_swapped).item())
    # perfect agreement and perfect reversal
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert kendall_tau_b(x, x).item() == pytest.approx(1.0) and spearman(x, -x).item() == pytest.approx(-1.0)
    assert ndcg_at_k(x, x, [4]).item() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 6, (12, 40), generator=g).double()  # ties in the scores
    y = torch.randint(0, 4, (12, 40), generator=g).double()  # ties in the relevance
    x[0] = torch.randn(40, generator=g).double()  # one row without score ties
    rho, tau = spearman(x, y), kendall_tau_b(x, y)
    for q in range(12):
        assert rho[q].item() == pytest.approx(stats.spearmanr(x[q].numpy(), y[q].numpy()).statistic, abs=1e-12)
        expected = stats.kendalltau(x[q].numpy(), y[q].numpy(), variant="b").statistic
        assert tau[q].item() == pytest.approx(expected, abs=1e-12)


def test_kendall_on_long_rows_matches_scipy():
    """The merge-sort count across many levels (K = 1000, not a power of two), real-valued scores."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 1000, generator=g), torch.randint(0, 7, (3, 1000), generator=g).float()
    x[2, :500] = x[2, 500:]  # duplicated scores
    tau = kendall_tau_b(x, y)
    for q in range(3):
        assert tau[q].item() == pytest.approx(stats.kendalltau(x[q].numpy(), y[q].numpy()).statistic, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_ndcg_and_ap_match_sklearn(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(10, 30, generator=g).double()  # distinct scores: sklearn orders ties differently
    rel = torch.randint(0, 4, (10, 30), generator=g).double()  # graded relevance with ties
    for k in (1, 5, 10, 30):
        got = ndcg_at_k(scores, rel, [k])[0]
        for q in range(10):
            assert got[q].item() == pytest.approx(ndcg_score(rel[q : q + 1].numpy(), scores[q : q + 1].numpy(), k=k))
    ap = average_precision(scores, rel)
    for q in range(10):
        assert ap[q].item() == pytest.approx(average_precision_score(rel[q].numpy() > 0, scores[q].numpy()))


def test_undefined_queries_are_left_out_and_counted():
    emb = torch.eye(4)
    rel = torch.zeros(4, 4)
    summary = relevance_metrics(emb, emb, rel, ks=(1,))
    assert summary == {
        "ndcg@1": None,
        "map": None,
        "spearman": None,
        "kendall": None,
        "num_queries": 4,
        "num_no_relevant": 4,
        "num_constant": 4,
    }
    rel[0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # query 0 ranks by score [1, 0, 0, 0]: ties in the scores
    summary = relevance_metrics(emb, emb, rel, ks=(1,))
    assert summary["num_no_relevant"] == 3 and summary["num_constant"] == 3
    assert summary["kendall"] == pytest.approx(bf_kendall([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]))
    scores_constant = relevance_metrics(torch.ones(3, 2), torch.ones(3, 2), torch.eye(3), ks=(1,))
    assert scores_constant["num_constant"] == 3 and scores_constant["num_no_relevant"] == 0


def test_bad_inputs_name_the_problem():
    emb = torch.randn(4, 3)
    negative = torch.eye(4)
    negative[0, 1] = -1.0
    with pytest.raises(ValueError, match="1 negative or non-finite"):
        relevance_metrics(emb, emb, negative)
    with pytest.raises(ValueError, match="non-finite"):
        relevance_metrics(emb.clone().fill_(torch.nan), emb, torch.eye(4))
    with pytest.raises(ValueError, match=r"must be \(4, 5\)"):
        relevance_ranking(emb, torch.randn(5, 3), torch.eye(4))
    with pytest.raises(ValueError, match="exclude_self needs"):
        relevance_ranking(emb, torch.randn(5, 3), torch.ones(4, 5), exclude_self=True)


def test_geometry_matches_loops():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 5, generator=g).double(), torch.randn(7, 5, generator=g).double()

    def unit(rows):
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in rows.tolist()]

    ui, ut = unit(img), unit(txt)
    centre_i = [sum(r[d] for r in ui) / 7 for d in range(5)]
    centre_t = [sum(r[d] for r in ut) / 7 for d in range(5)]
    gap = math.sqrt(sum((a - b) ** 2 for a, b in zip(centre_i, centre_t, strict=True)))
    assert modality_gap(img, txt).item() == pytest.approx(gap, abs=1e-12)
    align = sum(sum((a - b) ** 2 for a, b in zip(x, y, strict=True)) for x, y in zip(ui, ut, strict=True)) / 7
    assert alignment(img, txt).item() == pytest.approx(align, abs=1e-12)
    for rows in (ui, ut):
        terms = [
            math.exp(-2 * sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True)))
            for i in range(7)
            for j in range(7)
            if i != j
        ]
        source = img if rows is ui else txt
        for block in (2, 1024):
            got = uniformity(source, block_size=block).item()
            assert got == pytest.approx(math.log(sum(terms) / len(terms)), abs=1e-9)
    assert modality_gap(img, img).item() == pytest.approx(0.0, abs=1e-12)


def test_shared_fact_relevance_counts_distinct_shared_facts():
    a = [["red", "circle", "red circle"], ["blue", "square", "square"], []]
    b = [["red", "square"], ["circle", "red circle", "left"], ["blue", "blue"]]
    got = shared_fact_relevance(a, b)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    for i in range(3):
        for j in range(3):
            assert got[i, j].item() == sum(1 for f in set(a[i]) if f in b[j])
    with pytest.raises(ValueError, match=r"facts_a\[1\]='blue'"):
        shared_fact_relevance([["red"], "blue"], b)


def test_scoring_stays_on_the_device_without_host_reads():
    from test_fake_device import CpuOps, _on_cuda
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        # The relevance on the CPU, as the shared-facts matrix and a user's .npy arrive; the embeddings on the GPU.
        q, rel = torch.randn(6, 4, device="cuda"), torch.rand(6, 6)
        cpu_ops = CpuOps()
        with cpu_ops:
            ranked = relevance_ranking(q, q, rel, ks=(1, 3), exclude_self=True, block_size=4)
            geometry = [modality_gap(q, q), alignment(q, q), uniformity(q, block_size=4)]
    assert cpu_ops.found == []
    assert ranked.ndcg.shape == (2, 6) and ranked.kendall.shape == (6,)
    assert _on_cuda(*ranked, *geometry)


# ---------------------------------------------------------------- relevance_eval on a tiny model

SHAPES = ("square", "circle", "star")


def fact_samples(n: int, seed: int = 5) -> list[dict]:
    """``n`` samples: a coloured square image, facts of a made-up scene and a caption stating part of them."""
    rng = random.Random(seed)
    colours = list(COLOURS)
    samples = []
    for i, (data, label) in enumerate(make_images(n, seed=seed)):
        image_facts = sorted({colours[label], SHAPES[i % 3], f"{colours[label]} {SHAPES[i % 3]}", rng.choice("lr")})
        caption_facts = sorted(rng.sample(image_facts, rng.randint(1, len(image_facts))))
        meta = {"image_facts": image_facts, "caption_facts": caption_facts, "scene": i}
        samples.append({"png": data, "txt": " and ".join(caption_facts), "json": json.dumps(meta)})
    return samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    tokenizer = build_tokenizer(cfg.model.text.name_or_path)
    export = save_export(model.state_dict(), cfg.model, tmp_path_factory.mktemp("relevance") / "export")
    dc = model.image_tower.data_config()
    kw = {"image_size": 32, "mean": list(dc["mean"]), "std": list(dc["std"]), "progress": False, "max_length": 16}
    return model, tokenizer, export, kw


def test_relevance_eval_matches_brute_force_on_hand_embeddings(tiny, tmp_path):
    model, tokenizer, _, kw = tiny
    samples = fact_samples(14)
    samples[6]["json"] = "not json"  # skipped: bad_json
    spec = write_shards(tmp_path / "facts", samples, [5, 9])
    got = relevance_eval(model, tokenizer, data=spec, batch_size=4, text_batch_size=3, ks=(1, 5), **kw)
    kept = [s for i, s in enumerate(samples) if i != 6]
    assert got["num_images"] == 13 and got["skipped"] == {"bad_json": 1}
    assert got["task"] == "relevance" and got["relevance"] == "shared_facts" and got["data"] == spec
    # embeddings by hand, relevance by set intersection, metrics by the brute-force loops
    transform = build_image_transform(32, mean=kw["mean"], std=kw["std"], train=False)
    opened = open_eval_data(
        spec, image_transform=transform, batch_size=100, labels=False, captions="txt", metadata=True
    )
    batch = next(iter(opened.loader))
    tok = tokenizer([s["txt"] for s in kept], padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(model.encode_image(batch["image"]), dim=-1)
        txt = F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"]), dim=-1)
    facts = [json.loads(s["json"]) for s in kept]
    image_facts, caption_facts = [f["image_facts"] for f in facts], [f["caption_facts"] for f in facts]
    assert batch["json"] == facts and batch["captions"] == [[s["txt"]] for s in kept]

    def shared(a, b):
        return torch.tensor([[float(len(set(x) & set(y))) for y in b] for x in a])

    cases = {
        "i2t": (img @ txt.T, shared(image_facts, caption_facts), False),
        "t2i": (txt @ img.T, shared(caption_facts, image_facts), False),
        "i2i": (img @ img.T, shared(image_facts, image_facts), True),
        "t2t": (txt @ txt.T, shared(caption_facts, caption_facts), True),
    }
    for d, (scores, rel, exclude_self) in cases.items():
        rows = list(bf_rows(scores, rel, exclude_self))
        for k in (1, 5):
            assert_close_or_none(got[f"{d}_ndcg@{k}"], bf_mean([bf_ndcg(s, r, k) for s, r in rows]), tol=1e-6)
        assert_close_or_none(got[f"{d}_map"], bf_mean([bf_ap(s, r) for s, r in rows]), tol=1e-6)
        assert_close_or_none(got[f"{d}_spearman"], bf_mean([bf_spearman(s, r) for s, r in rows]), tol=1e-6)
        assert_close_or_none(got[f"{d}_kendall"], bf_mean([bf_kendall(s, r) for s, r in rows]), tol=1e-6)
        assert got[f"num_{d}_constant"] == sum(bf_kendall(s, r) is None for s, r in rows)
    assert got["modality_gap"] == pytest.approx((img.mean(0) - txt.mean(0)).norm().item(), abs=1e-6)
    assert got["alignment"] == pytest.approx(((img - txt) ** 2).sum(1).mean().item(), abs=1e-6)
    assert got["uniformity_text"] == pytest.approx(uniformity(txt).item(), abs=1e-6)
    assert json.loads(json.dumps(got, allow_nan=False)) == got

    # the user's relevance: a callable that sees the kept samples, the same matrices as a mapping (on shards
    # without the bad sample: a matrix given up front makes the .json unread), one .npy matrix for every direction
    matrices = {"i2i": cases["i2i"][1], "t2t": cases["t2t"][1], "i2t": cases["t2i"][1].T}
    common = {"batch_size": 2, "ks": (1, 5), **kw}
    seen = []

    def from_metadata(keys, metadata):
        seen.append((keys, metadata))
        return {name: m.numpy() for name, m in matrices.items()}

    # two DataLoader workers interleave their batches: the facts must follow their images back into input order
    by_callable = relevance_eval(model, tokenizer, data=spec, relevance=from_metadata, num_workers=2, **common)
    assert seen[0][0] == [f"s{i:06d}" for i in range(14) if i != 6] and seen[0][1] == facts
    assert by_callable.pop("relevance") == "user" and got.pop("relevance") == "shared_facts"
    assert by_callable == got
    clean = write_shards(tmp_path / "clean", kept, [13])
    by_mapping = relevance_eval(model, tokenizer, data=clean, relevance=matrices, **common)
    assert by_mapping.pop("data") == clean and by_mapping["skipped"] == {}
    assert {k: v for k, v in by_mapping.items() if k not in ("relevance", "skipped")} == {
        k: v for k, v in got.items() if k not in ("data", "skipped")
    }
    np.save(tmp_path / "rel.npy", cases["i2i"][1].numpy())
    by_file = relevance_eval(model, tokenizer, data=clean, relevance=str(tmp_path / "rel.npy"), **common)
    assert by_file["i2i_kendall"] == got["i2i_kendall"] and by_file["i2t_kendall"] != got["i2t_kendall"]
    with pytest.raises(ValueError, match=r"shape \(3, 3\) but 14 samples were read"):
        relevance_eval(model, tokenizer, data=spec, relevance=torch.eye(3), **common)


def test_relevance_eval_errors_name_the_fix(tiny, tmp_path):
    model, tokenizer, _, kw = tiny
    samples = fact_samples(4)
    samples[2]["json"] = json.dumps({"image_facts": ["red"]})
    spec = write_shards(tmp_path / "no-caption-facts", samples, [4])
    with pytest.raises(ValueError, match=r"no 'caption_facts' list.*pass relevance="):
        relevance_eval(model, tokenizer, data=spec, **kw)
    with pytest.raises(FileNotFoundError, match=r"existing \.npy file"):
        relevance_eval(model, tokenizer, data=spec, relevance=str(tmp_path / "missing.npy"), **kw)


def test_cli_relevance(tiny, tmp_path):
    model, tokenizer, export, kw = tiny
    spec = write_shards(tmp_path / "facts", fact_samples(8), [8])
    out = tmp_path / "relevance.json"
    cmd = [sys.executable, "-m", "rankclip_ds.evaluate", "relevance", "--model", str(export), "--data", spec]
    cmd += ["--output", str(out), "--no-progress", "--ks", "1,3", "--image-size", "32", "--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=clean_launcher_env())
    assert proc.returncode == 0, proc.stderr
    assert "[relevance]" in proc.stdout
    result = json.loads(out.read_text())
    expected = relevance_eval(model, tokenizer, data=spec, ks=(1, 3), batch_size=4, **kw)
    assert result.pop("model") == str(export)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
import rankclip_ds
from rankclip_ds.evaluate import relevance_eval

dist.init_process_group("gloo")
torch.set_num_threads(1)
model, tokenizer = rankclip_ds.load_model(sys.argv[1], with_tokenizer=True)
result = relevance_eval(model, tokenizer, data=sys.argv[2], **json.loads(sys.argv[3]))
with open(sys.argv[4], "w") as f:
    json.dump(result, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_match_one_process(tiny, tmp_path):
    model, tokenizer, export, kw = tiny
    samples = fact_samples(11)
    samples[1]["png"] = b"corrupt"  # rank 0's slice loses a sample: uneven slices, lockstep forwards
    spec = write_shards(tmp_path / "facts", samples, [4, 7])
    kw = {**kw, "batch_size": 2, "text_batch_size": 3, "ks": [1, 5]}
    expected = relevance_eval(model, tokenizer, data=spec, **kw)
    assert expected["skipped"] == {"decode_error": 1}
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    run_ranks(
        lambda rank: [sys.executable, "-c", WORKER, str(export), spec, json.dumps(kw), str(outs[rank])], timeout=260
    )
    results = [json.loads(o.read_text()) for o in outs]
    assert results[0] == results[1] == json.loads(json.dumps(expected))
