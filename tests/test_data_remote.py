"""Remote shards on a bad network: real HTTP and S3 (moto) servers on 127.0.0.1 with faults injected per object.

Resets in the middle of a shard, short bodies, slow answers, 404/403/503 and truncated objects; what is retried,
from which byte, what is skipped and counted by reason, that two ranks still yield ``len(loader)`` batches with a
shard gone, the pre-flight's credential check, and that no credential reaches the logs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _remote_servers import Fault, FaultyServer, MotoS3
from PIL import Image

from rankclip_ds.data.records import iter_records
from rankclip_ds.data.redact import redact, redact_url
from rankclip_ds.data.remote import RemoteError, RemotePolicy, open_remote
from rankclip_ds.data.shard_writer import TarShardWriter
from rankclip_ds.data.skips import SkipCounter

REPO = Path(__file__).resolve().parents[1]
FAST = RemotePolicy(retries=3, backoff_s=0.001, backoff_max_s=0.004, timeout_s=2.0)
SIZES = {"part0.tar": 30, "part1.tar": 25, "part2.tar": 20, "part3.tar": 28}
SECRET_PASSWORD = "pa55-Wr0ng-H0rse"
SECRET_SIGNATURE = "f00dfacecafebabe1234"


def jpeg(value: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(value)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_remote_shards(root: Path) -> dict[str, list[str]]:
    """``SIZES`` shards of decodable samples (plus a 3 KB json member, so that a shard spans many reads) and their
    ``_manifest.json``; returns the keys of each shard."""
    root.mkdir(parents=True, exist_ok=True)
    keys: dict[str, list[str]] = {}
    k = 0
    for name, n in SIZES.items():
        keys[name] = []
        with TarShardWriter(root / name) as writer:
            for _ in range(n):
                key = f"s{k:05d}"
                pad = json.dumps({"pad": "x" * 3000, "i": k})
                writer.write({"__key__": key, "jpg": jpeg(k), "txt": f"a red square number {k}", "json": pad})
                keys[name].append(key)
                k += 1
    (root / "_manifest.json").write_text(json.dumps({"shards": SIZES}))
    data = (root / "part0.tar").read_bytes()
    (root / "cut.tar").write_bytes(data[: len(data) // 2 + 700])  # ends inside a member
    return keys


@pytest.fixture(scope="module")
def remote_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote") / "shards"
    return root, write_remote_shards(root)


@pytest.fixture
def http(remote_shards):
    server = FaultyServer(root=remote_shards[0].parent)
    yield server
    server.close()


def read(url: str, policy: RemotePolicy = FAST) -> tuple[list[str], dict[str, int]]:
    skips = SkipCounter(shared=False)
    keys = [record["__key__"] for record in iter_records(url, skips, remote=policy)]
    return keys, skips.counts()


def size_of(remote_shards, name: str) -> int:
    return (remote_shards[0] / name).stat().st_size


# ------------------------------------------------------------------------------------------------ http
def test_reset_in_the_middle_of_a_shard_is_retried_and_yields_each_record_once(http, remote_shards):
    at = size_of(remote_shards, "part0.tar") // 2
    http.faults["/shards/part0.tar"] = Fault("reset", times=1, at=at)
    keys, counts = read(http.url("shards/part0.tar"))
    assert keys == remote_shards[1]["part0.tar"]  # all of them, in order: none repeated, none lost
    assert counts == {"remote_retry": 1}
    attempts = http.attempts("shards/part0.tar")
    assert len(attempts) == 2 and attempts[0] == 0 and 0 <= attempts[1] <= at


def test_short_body_resumes_at_the_byte_where_it_stopped(http, remote_shards):
    at = size_of(remote_shards, "part1.tar") // 3
    http.faults["/shards/part1.tar"] = Fault("short", times=1, at=at)
    keys, counts = read(http.url("shards/part1.tar"))
    assert keys == remote_shards[1]["part1.tar"]
    assert counts == {"remote_retry": 1}  # the second request starts at `at`: the fault's offset is not inside it
    assert http.attempts("shards/part1.tar") == [0, at]  # Range: bytes=at-, exactly where the body ended


def test_a_reset_that_keeps_coming_back_is_given_up_after_the_retries(http, remote_shards):
    at = size_of(remote_shards, "part2.tar") // 2
    http.faults["/shards/part2.tar"] = Fault("reset", times=None, at=at)
    keys, counts = read(http.url("shards/part2.tar"))
    assert counts == {"remote_retry": FAST.retries, "remote_failed": 1}
    assert len(http.attempts("shards/part2.tar")) == FAST.retries + 1
    full = remote_shards[1]["part2.tar"]
    assert 0 < len(keys) < len(full) and keys == full[: len(keys)]  # the records before the damage are kept


def test_a_link_that_drops_often_but_advances_is_read_to_the_end(http, remote_shards):
    """retries bounds failures in a row *without progress*: 6 cuts, 3 retries allowed, the shard is read whole."""
    size = size_of(remote_shards, "part3.tar")
    every = size // 6 + 1
    http.faults["/shards/part3.tar"] = Fault("short", times=None, every=every)
    keys, counts = read(http.url("shards/part3.tar"))
    assert keys == remote_shards[1]["part3.tar"] and counts == {"remote_retry": 5}
    assert http.attempts("shards/part3.tar") == [i * every for i in range(6)]


def test_an_object_that_changes_between_requests_is_not_stitched(http, remote_shards, tmp_path):
    """The resumed request carries If-Range with the first ETag: the new object answers 200, which is refused."""
    folder = http.root / "changing"
    folder.mkdir(exist_ok=True)
    (folder / "x.tar").write_bytes((remote_shards[0] / "part0.tar").read_bytes())
    replace = lambda: (folder / "x.tar").write_bytes((remote_shards[0] / "part1.tar").read_bytes())  # noqa: E731
    at = size_of(remote_shards, "part0.tar") // 2
    http.faults["/changing/x.tar"] = Fault("short", times=1, at=at, then=replace)
    keys, counts = read(http.url("changing/x.tar"))
    assert counts == {"remote_retry": 1, "remote_failed": 1}  # retried once, then refused: not the same object
    full = remote_shards[1]["part0.tar"]
    assert 0 < len(keys) < len(full) and keys == full[: len(keys)]  # nothing of part1 mixed in


def test_slow_server_times_out_and_is_retried(http, remote_shards):
    policy = RemotePolicy(retries=2, backoff_s=0.001, backoff_max_s=0.001, timeout_s=0.3)
    http.faults["/shards/part3.tar"] = Fault("sleep", times=1, seconds=1.2)
    keys, counts = read(http.url("shards/part3.tar"), policy)
    assert keys == remote_shards[1]["part3.tar"] and counts == {"remote_retry": 1}
    http.faults["/shards/part3.tar"] = Fault("sleep", times=None, seconds=0.6)
    started = time.monotonic()
    keys, counts = read(http.url("shards/part3.tar"), policy)
    assert keys == [] and counts == {"remote_retry": 2, "remote_failed": 1}
    assert time.monotonic() - started < 3 * 3 * 0.6 + 5  # did not hang: 3 attempts of one timeout each


@pytest.mark.parametrize(("status", "reason"), [(404, "remote_not_found"), (403, "remote_forbidden")])
def test_not_found_and_forbidden_are_not_retried(http, status, reason):
    http.faults["/shards/part0.tar"] = Fault("status", times=None, status=status)
    keys, counts = read(http.url("shards/part0.tar"))
    assert keys == [] and counts == {reason: 1}
    assert http.attempts("shards/part0.tar") == [0]


def test_server_errors_are_retried_with_backoff(http, remote_shards):
    http.faults["/shards/part0.tar"] = Fault("status", times=2, status=503)
    keys, counts = read(http.url("shards/part0.tar"))
    assert keys == remote_shards[1]["part0.tar"] and counts == {"remote_retry": 2}
    # the waits: one per retry, each min(max, base·2^k) scaled into [0.5, 1]
    http.faults["/shards/part0.tar"] = Fault("status", times=None, status=429)
    policy = RemotePolicy(retries=4, backoff_s=1.0, backoff_max_s=3.0, timeout_s=2.0)
    waits: list[float] = []
    with pytest.raises(RemoteError) as info:
        open_remote(http.url("shards/part0.tar"), policy, sleep=waits.append)
    assert info.value.reason == "remote_failed" and "4 retries" in str(info.value)
    assert len(waits) == 4 and len(http.attempts("shards/part0.tar")) == 3 + 5
    for wait, cap in zip(waits, (1.0, 2.0, 3.0, 3.0), strict=True):
        assert 0.5 * cap <= wait <= cap


def test_truncated_object_is_a_truncated_tar_with_the_records_before_kept(http, remote_shards):
    keys, counts = read(http.url("shards/cut.tar"))
    full = remote_shards[1]["part0.tar"]
    assert counts == {"truncated_tar": 1}  # served whole and on time: nothing to retry
    assert 0 < len(keys) < len(full) and keys == full[: len(keys)]
    assert http.attempts("shards/cut.tar") == [0]


def test_url_credentials_are_sent_as_basic_auth(remote_shards):
    server = FaultyServer(root=remote_shards[0].parent, auth=f"reader:{SECRET_PASSWORD}")
    try:
        keys, counts = read(server.url("shards/part1.tar", userinfo=f"reader:{SECRET_PASSWORD}"))
        assert keys == remote_shards[1]["part1.tar"] and counts == {}
        assert read(server.url("shards/part1.tar")) == ([], {"remote_forbidden": 1})  # 401 without them
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------ redaction
def test_redact_removes_url_credentials_signatures_and_secret_env_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecretvalue42")
    url = (
        f"https://bob:{SECRET_PASSWORD}@h.example/a/b.tar?X-Amz-Credential=AKIA1&X-Amz-Signature={SECRET_SIGNATURE}"
        "&X-Amz-Expires=60&sig=abc&token=tok"
    )
    assert redact_url(url) == (
        "https://***@h.example/a/b.tar?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60&sig=***&token=***"
    )
    text = redact(
        f"failed {url} and pipe:curl -u bob:{SECRET_PASSWORD} -H 'Authorization: Bearer xyz' envsecretvalue42"
    )
    for secret in (SECRET_PASSWORD, SECRET_SIGNATURE, "AKIA1", "xyz", "envsecretvalue42"):
        assert secret not in text
    assert "h.example/a/b.tar" in text and "X-Amz-Expires=60" in text  # the rest stays readable


# ------------------------------------------------------------------------------------------------ loader
def secret_spec(server: FaultyServer) -> str:
    base = server.url("shards", userinfo=f"reader:{SECRET_PASSWORD}")
    return f"{base}/part{{0..3}}.tar?X-Amz-Signature={SECRET_SIGNATURE}"


def test_two_ranks_yield_len_loader_batches_with_one_shard_gone_and_no_secret_in_the_logs(remote_shards, caplog):
    """Epoch mode over http: part2 answers 404 forever, part0 is reset once. Counts come from the _manifest.json
    beside the shards (fetched over http). Both ranks still yield exactly len(loader) batches."""
    from rankclip_ds.data import build_image_transform, build_train_loader

    server = FaultyServer(root=remote_shards[0].parent, auth=f"reader:{SECRET_PASSWORD}")
    server.faults["/shards/part2.tar"] = Fault("status", times=None, status=404)
    server.faults["/shards/part0.tar"] = Fault("reset", times=1, at=size_of(remote_shards, "part0.tar") // 2)
    caplog.set_level(logging.INFO)
    try:
        counts, skips = [], {}
        for rank in range(2):
            loader = build_train_loader(
                secret_spec(server),
                tokenizer=None,
                image_transform=build_image_transform(16, train=True),
                batch_size=4,
                num_workers=0,
                seed=0,
                rank=rank,
                world_size=2,
            )
            batches = sum(1 for _ in loader.epoch_iter(0))
            counts.append((batches, len(loader)))
            for reason, n in loader.skip_counts().items():
                skips[reason] = skips.get(reason, 0) + n
    finally:
        server.close()
    assert counts[0][0] == counts[0][1] == counts[1][0] == counts[1][1] == sum(SIZES.values()) // 8
    assert skips.get("remote_not_found", 0) >= 1 and skips.get("remote_retry", 0) >= 1
    assert "remote_not_found" in caplog.text and "***@127.0.0.1" in caplog.text
    assert SECRET_PASSWORD not in caplog.text and SECRET_SIGNATURE not in caplog.text


def test_inspect_shards_counts_remote_shards_into_a_manifest(http, remote_shards, tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import inspect_shards

    out = tmp_path / "_manifest.json"
    inspect_shards.main([http.url("shards/part{0..1}.tar"), "--no-decode", "--manifest-path", str(out)])
    assert json.loads(out.read_text())["shards"] == {"part0.tar": 30, "part1.tar": 25}


def test_inspect_shards_refuses_to_write_a_manifest_beside_remote_shards(http, remote_shards, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import inspect_shards

    with pytest.raises(SystemExit) as exc:
        inspect_shards.main([http.url("shards/part{0..1}.tar", userinfo="u:hunter2"), "--no-decode", "--manifest"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "pass --manifest-path _manifest.json" in err and "***@127.0.0.1" in err and "hunter2" not in err


# ------------------------------------------------------------------------------------------------ s3 (moto)
@pytest.fixture(scope="module")
def moto(remote_shards):
    pytest.importorskip("moto", reason="moto[server] is pinned in requirements-dev.txt")
    s3 = MotoS3()
    s3.upload(remote_shards[0], "train")
    yield s3
    s3.close()


@pytest.fixture
def s3_env(moto, monkeypatch):
    for name, value in moto.env(through_proxy=True).items():
        monkeypatch.setenv(name, value)
    moto.proxy.faults.clear()
    return moto


def test_s3_shard_read_with_a_reset_in_the_middle_through_a_proxy(s3_env, remote_shards):
    at = size_of(remote_shards, "part0.tar") // 2
    s3_env.proxy.faults["/shards/train/part0.tar"] = Fault("reset", times=1, at=at)
    keys, counts = read("s3://shards/train/part0.tar")
    assert keys == remote_shards[1]["part0.tar"] and counts == {"remote_retry": 1}
    attempts = s3_env.proxy.attempts("shards/train/part0.tar")
    assert len(attempts) == 2 and attempts[0] == 0 and 0 <= attempts[1] <= at


def test_s3_short_body_resumes_with_a_range_request(s3_env, remote_shards):
    at = size_of(remote_shards, "part1.tar") // 3
    s3_env.proxy.faults["/shards/train/part1.tar"] = Fault("short", times=1, at=at)
    keys, counts = read("s3://shards/train/part1.tar")
    assert keys == remote_shards[1]["part1.tar"] and counts == {"remote_retry": 1}
    assert s3_env.proxy.attempts("shards/train/part1.tar") == [0, at]


def test_s3_missing_key_forbidden_and_throttled(s3_env, remote_shards):
    assert read("s3://shards/train/nope.tar") == ([], {"remote_not_found": 1})
    assert s3_env.proxy.attempts("shards/train/nope.tar") == [0]
    s3_env.proxy.faults["/shards/train/part2.tar"] = Fault("status", times=None, status=403)
    assert read("s3://shards/train/part2.tar") == ([], {"remote_forbidden": 1})
    s3_env.proxy.faults["/shards/train/part3.tar"] = Fault("status", times=2, status=503)
    keys, counts = read("s3://shards/train/part3.tar")
    assert keys == remote_shards[1]["part3.tar"] and counts == {"remote_retry": 2}


def test_s3_counts_come_from_the_manifest_beside_the_shards(s3_env):
    from rankclip_ds.data.sources import parse_spec, resolve_counts

    sources = parse_spec("s3://shards/train/part{0..3}.tar")
    resolve_counts(sources, remote=FAST)
    assert sources[0].counts == list(SIZES.values())


# ------------------------------------------------------------------------------------------------ pre-flight
def no_aws(monkeypatch, tmp_path) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_preflight_names_missing_s3_credentials_and_the_fix(monkeypatch, tmp_path):
    from rankclip_ds.data.checks import check_shards

    no_aws(monkeypatch, tmp_path)
    problems, _ = check_shards("s3://bucket/train/{0..9}.tar", caption_key="txt")
    assert len(problems) == 1 and problems[0].field == "data.train_data" and problems[0].machine
    message = problems[0].message
    assert "s3://bucket/train/{0..9}.tar" in message and "no credentials" in message
    for fix in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        assert fix in message
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE000000000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-example-000000")
    assert check_shards("s3://bucket/train/{0..9}.tar", caption_key="txt")[0] == []


def test_preflight_of_a_run_reports_s3_shards_without_credentials(monkeypatch, tmp_path):
    from rankclip_ds.config import load_config
    from rankclip_ds.preflight import preflight

    no_aws(monkeypatch, tmp_path)
    cfg = load_config(None, ["--data.train_data", "s3://bucket/train/{0..9}.tar"])
    ds_json = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    problems = [p for p in preflight(cfg, ds_json, 1, ds_source="zero2.json")[1] if p.field == "data.train_data"]
    assert len(problems) == 1 and "s3:// shards, but boto3 finds no credentials" in problems[0].message


def test_remote_settings_are_validated_with_the_key_and_the_fix():
    from rankclip_ds.config import ConfigError, DataConfig

    with pytest.raises(ConfigError, match=r"data.remote_retries=-1: must be an integer >= 0"):
        DataConfig(remote_retries=-1)
    with pytest.raises(ConfigError, match=r"data.remote_backoff_max_s=0.5: must be >= data.remote_backoff_s=1.0"):
        DataConfig(remote_backoff_max_s=0.5)
    with pytest.raises(ConfigError, match=r"data.remote_timeout_s=0: must be > 0"):
        DataConfig(remote_timeout_s=0)


# ------------------------------------------------------------------------------------------------ slow tier
WORKER = r"""
import json, logging, os, sys
import torch
import torch.distributed as dist
from rankclip_ds.data import build_image_transform, build_train_loader

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
loader = build_train_loader(sys.argv[1], tokenizer=None, image_transform=build_image_transform(16, train=True),
                            batch_size=4, num_workers=2, seed=3, rank=rank, world_size=world)
result = {"batches": [], "len": len(loader)}
for epoch in range(2):
    n = 0
    for batch in loader.epoch_iter(epoch):
        total = torch.tensor([batch["image"].shape[0]], dtype=torch.long)
        dist.all_reduce(total)  # hangs if the other rank has already left the epoch
        n += 1
    dist.barrier()
    result["batches"].append(n)
result["skips"] = loader.skip_counts()
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_real_ranks_two_workers_over_s3_with_a_shard_gone_and_a_reset(remote_shards, moto, tmp_path):
    """gloo, an all-reduce per batch, 2 workers per rank, over s3:// through the fault proxy: part2 is 403 for
    good, part1 is reset once; both ranks finish both epochs with len(loader) batches and no secret in stderr."""
    from conftest import run_ranks

    moto.proxy.faults.clear()
    moto.proxy.faults["/shards/train/part2.tar"] = Fault("status", times=None, status=403)
    moto.proxy.faults["/shards/train/part1.tar"] = Fault("reset", times=1, at=size_of(remote_shards, "part1.tar") // 2)
    outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    logs = run_ranks(
        lambda rank: [sys.executable, "-c", WORKER, "s3://shards/train/part{0..3}.tar", str(outs[rank])],
        env=moto.env(through_proxy=True),
    )
    results = [json.loads(o.read_text()) for o in outs]
    expected = sum(SIZES.values()) // 8
    assert [r["len"] for r in results] == [expected, expected]
    assert [r["batches"] for r in results] == [[expected, expected]] * 2
    skipped = {k: sum(r["skips"].get(k, 0) for r in results) for k in ("remote_forbidden", "remote_retry")}
    assert skipped["remote_forbidden"] >= 2 and skipped["remote_retry"] >= 1, skipped
    assert "remote_forbidden" in "".join(logs) and MotoS3.SECRET_KEY not in "".join(logs)
