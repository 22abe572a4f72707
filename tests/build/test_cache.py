import multiprocessing as mp
import os
from pathlib import Path

import pytest

from dskc import knobs
from dskc.build import cache


def _key(name="k", cfg=(("BLOCK_M", 64),)):
    return cache.CacheKey("triton", name, "abc", cfg, "sm90a", (("triton", "3.9"),))


def test_key_depends_on_every_field():
    base = _key()
    assert base.digest() == _key().digest()
    assert base.digest() != _key(cfg=(("BLOCK_M", 128),)).digest()
    assert base.digest() != cache.CacheKey("triton", "k", "abd", base.config, "sm90a", base.toolchain).digest()
    assert base.digest() != cache.CacheKey("triton", "k", "abc", base.config, "sm100a", base.toolchain).digest()


def test_miss_then_hit(tmp_path):
    calls = []

    def build(d: Path):
        calls.append(1)
        (d / "x.bin").write_bytes(os.urandom(64))
        return {"n": 7}

    with knobs.scope(cache_dir=tmp_path):
        e1, hit1 = cache.get_or_build(_key(), build)
        e2, hit2 = cache.get_or_build(_key(), build)
    assert (hit1, hit2) == (False, True) and e1 == e2 and len(calls) == 1
    assert cache.read_meta(e1) == {"n": 7}


def test_corrupt_entry_is_rebuilt(tmp_path, caplog):
    def build(d: Path):
        (d / "x.bin").write_bytes(b"good")
        return {}

    with knobs.scope(cache_dir=tmp_path):
        entry, _ = cache.get_or_build(_key(), build)
        (entry / "x.bin").write_bytes(b"evil")
        with caplog.at_level("WARNING", logger="dskc.build"):
            entry2, hit = cache.get_or_build(_key(), build)
    assert not hit and (entry2 / "x.bin").read_bytes() == b"good"
    assert "corrupt" in caplog.text


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: emulate with a file where the folder should be
        ro.chmod(0o700)
        ro = tmp_path / "file"
        ro.write_text("not a folder")
    with knobs.scope(cache_dir=ro / "sub"), pytest.raises(cache.CacheError, match="not writable"):
        cache.get_or_build(_key(), lambda d: {})


def _racer(root, q):
    with knobs.scope(cache_dir=Path(root)):
        entry, hit = cache.get_or_build(_key("race"), lambda d: (d / "x.bin").write_bytes(b"same") and {})
        q.put((str(entry), (entry / "x.bin").read_bytes()))


def test_concurrent_builders_agree(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), q)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = [q.get(timeout=5) for _ in procs]
    assert len({r[0] for r in results}) == 1 and all(r[1] == b"same" for r in results)
    assert not [p for p in (tmp_path / "triton").iterdir() if p.name.startswith(".tmp-")]
