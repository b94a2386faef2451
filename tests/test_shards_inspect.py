"""tools/inspect_shards.py: counts, failures, the manifest the loader uses, and the PNG grid."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from test_data_bad_input import REASON_OF_KEY, build_bad_shards
from test_data_pipeline import write_shards

from rankclip_ds.data.sources import parse_spec, resolve_counts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import inspect_shards


def test_report_manifest_and_grid(tmp_path, capsys):
    spec, _ = write_shards(tmp_path / "s", sizes=[3, 5])
    report = inspect_shards.main(
        [spec, "--manifest", "--grid", str(tmp_path / "grid.png"), "--grid-n", "6", "--json", str(tmp_path / "r.json")]
    )
    assert report["samples"] == 8 and report["shards"] == 2
    assert report["extensions"] == {"jpg": 8, "txt": 8}
    assert report["caption_words"]["min"] == report["caption_words"]["max"] == 5
    assert not report["failures"]
    manifest = json.loads((tmp_path / "s" / "_manifest.json").read_text())
    assert manifest["shards"] == {"part0-000000.tar": 3, "part1-000000.tar": 5}
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 0 and grid.height > 0
    assert json.loads(capsys.readouterr().out)["samples"] == 8
    # the loader takes counts from the manifest (here deliberately different from the tar contents)
    (tmp_path / "s" / "_manifest.json").write_text(
        json.dumps({"shards": {"part0-000000.tar": 2, "part1-000000.tar": 4}})
    )
    sources = parse_spec(spec)
    resolve_counts(sources)
    assert sources[0].counts == [2, 4]


def test_failures_are_reported(tmp_path):
    """One pass over every record: each bad sample once, under the reason it was built with, the missing shard
    and the truncated one once each."""
    spec, good, bad = build_bad_shards(tmp_path)
    report = inspect_shards.main([spec, "--max-pixels", "10000"])
    assert report["failures"] == {**Counter(REASON_OF_KEY.values()), "missing_shard": 1, "truncated_tar": 1}
    assert set(REASON_OF_KEY) == bad
    assert report["ignored_members"] == {"unknown_extension": 6}
    assert report["samples"] == len(good) + len(bad) + 3  # the truncated shard's three complete records
