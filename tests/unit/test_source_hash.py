"""taxiway.benchmarks.source_hash: every result's machine block names the code it ran by content,
since a commit field can be wrong (the GPU machine's copy of a tree may carry older git metadata)."""

from taxiway.benchmarks import SOURCE_DIRS, machine_info, source_hash


def _tree(root, files: dict[str, str]):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_changes_with_a_python_file_and_nothing_else(tmp_path):
    _tree(tmp_path, {"gpu_engine/a.py": "x = 1\n", "bench/b.py": "y = 2\n", "bench/results/r.json": "{}",
                     "docs/c.py": "outside\n"})
    first = source_hash(tmp_path)
    assert len(first) == 16 and first == source_hash(tmp_path)
    (tmp_path / "bench/results/r.json").write_text('{"other": 1}')  # not code
    (tmp_path / "docs/c.py").write_text("changed\n")  # not a source folder
    (tmp_path / "gpu_engine/__pycache__").mkdir()
    (tmp_path / "gpu_engine/__pycache__/a.py").write_text("cache\n")
    assert source_hash(tmp_path) == first
    (tmp_path / "gpu_engine/a.py").write_text("x = 2\n")
    assert source_hash(tmp_path) != first


def test_a_renamed_file_changes_it(tmp_path):
    _tree(tmp_path, {"taxiway/a.py": "x = 1\n"})
    before = source_hash(tmp_path)
    (tmp_path / "taxiway/a.py").rename(tmp_path / "taxiway/b.py")
    assert source_hash(tmp_path) != before


def test_machine_info_carries_the_checkout_hash():
    assert "bench" in SOURCE_DIRS and machine_info()["source_sha256"] == source_hash()
