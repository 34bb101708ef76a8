"""Cache keys of the Prefect tasks: file contents, the params sections a step reads, and code."""
from core.params import sections_digest as params_digest
from tasks.caching import code_digest, hash_path, step_key


def test_hash_path_follows_contents_not_names(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"123")
    b.write_bytes(b"123")
    assert hash_path(a) == hash_path(b)
    b.write_bytes(b"124")
    assert hash_path(a) != hash_path(b)
    assert hash_path(tmp_path / "missing") != hash_path(a)
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    for d in (d1, d2):
        d.mkdir()
        (d / "x.txt").write_text("x")
    assert hash_path(d1) == hash_path(d2)
    (d2 / "y.txt").write_text("y")
    assert hash_path(d1) != hash_path(d2)


def test_code_digest_covers_transitive_core_imports(tmp_path, monkeypatch):
    import tasks.caching as c

    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "core" / "a.py").write_text("from core.b import f\n")
    (tmp_path / "core" / "b.py").write_text("def f():\n    return 1\n")
    (tmp_path / "core" / "c.py").write_text("X = 1\n")
    monkeypatch.setattr(c, "REPO", tmp_path)
    c.code_digest.cache_clear()
    before_a, before_c = code_digest("core.a"), code_digest("core.c")
    (tmp_path / "core" / "b.py").write_text("def f():\n    return 2\n")
    c.code_digest.cache_clear()
    assert code_digest("core.a") != before_a  # a imports b: its key moves
    assert code_digest("core.c") == before_c  # c does not: its key stays
    c.code_digest.cache_clear()


def test_step_key_depends_only_on_named_sections_and_files(tmp_path):
    img = tmp_path / "rgba.png"
    img.write_bytes(b"img")
    p1 = {"coarse": {"iters": 5}, "evaluate": {"n": 1}}
    p2 = {"coarse": {"iters": 5}, "evaluate": {"n": 2}}
    p3 = {"coarse": {"iters": 6}, "evaluate": {"n": 1}}
    key = lambda p: step_key({"params": p, "image": str(img), "out_dir": "x"}, ("core.params",), ("coarse",), ("image",))
    assert key(p1) == key(p2)
    assert key(p1) != key(p3)
    k1 = key(p1)
    img.write_bytes(b"other")
    assert key(p1) != k1
    assert params_digest(p1, ["coarse"]) == params_digest(p2, ["coarse"])


def test_dotted_sections_pick_one_value():
    a = {"evaluate": {"novel_views": 8, "clip_model": "A"}}
    b = {"evaluate": {"novel_views": 8, "clip_model": "B"}}
    c = {"evaluate": {"novel_views": 4, "clip_model": "A"}}
    assert params_digest(a, ["evaluate.novel_views"]) == params_digest(b, ["evaluate.novel_views"])
    assert params_digest(a, ["evaluate.novel_views"]) != params_digest(c, ["evaluate.novel_views"])
