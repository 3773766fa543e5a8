"""DatasetIndex: class order, labels, upright sizes, fingerprint, save/load, and clear errors."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.imagegen import make_image_folder, save, smooth_image
from mealv2.pipeline.dataset import DatasetError, DatasetIndex, load_index, safe_join


def test_scan_lists_classes_labels_and_upright_sizes(mixed_root):
    index = DatasetIndex.scan(mixed_root / "train")
    assert index.classes == ["class_0", "class_1", "class_2"]
    assert index.paths == sorted(index.paths)
    assert index.paths[0] == "class_0/img_000.jpg"
    np.testing.assert_array_equal(index.labels, np.repeat([0, 1, 2], 8))
    for path, size in zip(index.paths, index.sizes):
        with Image.open(index.root + "/" + path) as im:
            from PIL import ImageOps
            upright = ImageOps.exif_transpose(im)
            assert tuple(size) == (upright.height, upright.width), path
    rotated = index.paths.index("class_0/img_004.jpg")  # orientation 6: stored 64 wide, shown 64 high
    assert tuple(index.sizes[rotated]) == (64, 48)


def test_fingerprint_changes_with_content_and_not_with_location(tmp_path):
    make_image_folder(tmp_path / "a", classes=2, per_class=3, mixed=False)
    make_image_folder(tmp_path / "b", classes=2, per_class=3, mixed=False)
    first = DatasetIndex.scan(tmp_path / "a" / "train")
    assert first.fingerprint == DatasetIndex.scan(tmp_path / "b" / "train").fingerprint
    target = tmp_path / "b" / "train" / "class_1" / "img_000.jpg"
    save(smooth_image(np.random.default_rng(9), 30, 30, 0), target)
    assert DatasetIndex.scan(tmp_path / "b" / "train").fingerprint != first.fingerprint


def test_save_load_round_trip_is_pickle_free(mixed_root, tmp_path):
    index = DatasetIndex.scan(mixed_root / "train")
    index.save(tmp_path / "index.npz")
    with np.load(tmp_path / "index.npz", allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)
    loaded = DatasetIndex.load(tmp_path / "index.npz")
    assert loaded.paths == index.paths and loaded.classes == index.classes
    assert loaded.fingerprint == index.fingerprint
    np.testing.assert_array_equal(loaded.sizes, index.sizes)


def test_load_index_reuses_unchanged_headers(mixed_root, monkeypatch):
    first = load_index(mixed_root / "train")
    calls = []
    import mealv2.pipeline.dataset as dataset
    original = dataset.read_header
    monkeypatch.setattr(dataset, "read_header", lambda path: calls.append(path) or original(path))
    second = load_index(mixed_root / "train")
    assert calls == [] and second.fingerprint == first.fingerprint


def test_missing_split_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"train: no such split folder"):
        DatasetIndex.scan(tmp_path / "train")


def test_empty_class_folder_is_named(tmp_path):
    split = make_image_folder(tmp_path, classes=2, per_class=2, mixed=False)
    (split / "class_9").mkdir()
    with pytest.raises(DatasetError, match=r"class_9: class folder holds no images"):
        DatasetIndex.scan(split)


def test_bad_file_fails_by_default_and_is_recorded_with_skip_bad(tmp_path):
    split = make_image_folder(tmp_path, classes=2, per_class=3, mixed=False)
    (split / "class_0" / "broken.jpg").write_bytes(b"not an image at all")
    (split / "class_1" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"broken\.jpg: not a readable JPEG or PNG"):
        DatasetIndex.scan(split)
    index = DatasetIndex.scan(split, skip_bad=True)
    assert len(index) == 6
    assert any("broken.jpg" in s for s in index.skipped) and any("notes.txt" in s for s in index.skipped)


def test_other_image_formats_are_refused(tmp_path):
    split = make_image_folder(tmp_path, classes=1, per_class=1, mixed=False)
    Image.new("RGB", (8, 8)).save(split / "class_0" / "x.png", "GIF")
    with pytest.raises(DatasetError, match=r"x\.png: expected a JPEG or PNG image, found GIF"):
        DatasetIndex.scan(split)


@pytest.mark.parametrize("bad", ["../etc/passwd", "/etc/passwd", "a/../../b", ""])
def test_safe_join_refuses_escapes(bad, tmp_path):
    with pytest.raises(DatasetError):
        safe_join(tmp_path, bad)
    assert safe_join(tmp_path, "a/b.jpg") == str(tmp_path / "a" / "b.jpg")


def test_a_scan_keeps_a_bounded_window_of_files_in_flight(tmp_path, monkeypatch):
    """A Future a file, all submitted at once (thread pools' map), took 1.7 KB an image: 25-29 GB for ImageNet-21k
    before any labelling. The scan and the content fingerprint keep at most SCAN_WINDOW submitted ahead."""
    import concurrent.futures

    import mealv2.pipeline.dataset as dataset

    source = tmp_path / "one.jpg"
    save(smooth_image(np.random.default_rng(0), 8, 8, 0), source)
    for i in range(700):  # hard links: 700 files, one picture
        folder = tmp_path / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(source, folder / f"{i:04d}.jpg")
    monkeypatch.setattr(dataset, "SCAN_WINDOW", 64)
    submitted, finished, most_ahead = 0, 0, 0
    submit = concurrent.futures.ThreadPoolExecutor.submit

    def counted(pool, work, *args):
        nonlocal submitted, most_ahead

        def run(*a):
            nonlocal finished
            try:
                return work(*a)
            finally:
                finished += 1
        submitted += 1
        most_ahead = max(most_ahead, submitted - finished)
        return submit(pool, run, *args)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", counted)
    index = DatasetIndex.scan(tmp_path / "train", workers=2)
    index.fingerprint_of("content", workers=2)
    assert len(index) == 700 and submitted >= 1400 and most_ahead <= 64


def _private_dirty_kb() -> int:
    """This process's private dirty memory (pages it wrote, copy-on-write copies among them), in kB."""
    with open("/proc/self/smaps_rollup") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Private_Dirty:"))


def test_forked_workers_read_the_paths_without_copying_them():
    """DataLoader workers are forked: reading a list of str objects writes each one's reference count, so a worker
    copies every page holding them (pytorch #13246: 98 MB a worker at ImageNet-1k). The index keeps its paths as two
    arrays, which a worker reads without writing."""
    import multiprocessing
    import sys

    names = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i:08d}.JPEG" for i in range(100_000)]
    index = DatasetIndex(root="/data/train", paths=names, labels=np.arange(len(names)) % 1000,
                         sizes=np.ones((len(names), 2), np.int32), byte_sizes=np.ones(len(names), np.int64),
                         classes=[f"n{c:08d}" for c in range(1000)])
    as_objects = sum(map(sys.getsizeof, names))
    del names
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def worker():
        before = _private_dirty_kb()
        assert sum(len(index.file(i)) for i in range(len(index)))  # one path an item, as a pass over the data
        send.send((_private_dirty_kb() - before) * 1024)

    process = context.Process(target=worker)
    process.start()
    grown = receive.recv()
    process.join()
    assert grown < as_objects / 4, (grown, as_objects)


def _spy(monkeypatch, name: str, under: Path) -> list[Path]:
    """The paths in ``under`` that ``os.<name>`` (scandir or stat) is called on from now on; the real call works."""
    seen, real = [], getattr(os, name)

    def spy(path, *args, **kwargs):
        if Path(os.fspath(path)).is_relative_to(under):
            seen.append(Path(os.fspath(path)))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(os, name, spy)
    return seen


def _settled_after(monkeypatch, seconds: float, wait: bool = True) -> None:
    """Folders count as settled (their stamps trusted) once ``seconds`` old; with ``wait``, the ones made so far are."""
    import time

    import mealv2.pipeline.dataset as dataset

    monkeypatch.setattr(dataset, "SETTLED_NS", int(seconds * 1e9))
    if wait:
        time.sleep(1.5 * seconds)


def test_a_warm_start_lists_no_class_folder_and_looks_at_no_file(tmp_path, monkeypatch):
    """Every start listed every class folder and stat'ed every file (12.7 s at ImageNet-1k). A class folder whose
    mtime, ctime and inode are those recorded keeps its cached rows; a folder changed just before its listing
    (within one tick of the clock) is listed again; MEALV2_RESCAN=1 lists all and sees a file rewritten in place."""
    split = make_image_folder(tmp_path, classes=3, per_class=4, mixed=False).resolve()
    folders = [split / f"class_{c}" for c in range(3)]
    _settled_after(monkeypatch, 3600, wait=False)  # every folder too fresh to trust
    load_index(split)
    listed = _spy(monkeypatch, "scandir", split)
    load_index(split)
    assert listed == [split, *folders]
    _settled_after(monkeypatch, 0.05)
    first = load_index(split)  # lists every folder again: its stamps now hold
    listed.clear()
    looked_at = _spy(monkeypatch, "stat", split)
    warm = load_index(split)
    assert listed == [split] and not [path for path in looked_at if path.suffix == ".jpg"]
    assert warm.paths == first.paths and warm.fingerprint == first.fingerprint
    np.testing.assert_array_equal(warm.sizes, first.sizes)
    rewritten = folders[0] / "img_001.jpg"
    save(smooth_image(np.random.default_rng(5), 20, 30, 0), rewritten)  # in place: no folder changes
    assert load_index(split).fingerprint == first.fingerprint
    monkeypatch.setenv("MEALV2_RESCAN", "1")
    listed.clear()
    rescanned = load_index(split)
    assert listed == [split, *folders]
    row = rescanned.paths.index("class_0/img_001.jpg")
    assert rescanned.byte_sizes[row] == rewritten.stat().st_size and tuple(rescanned.sizes[row]) == (20, 30)


@pytest.mark.parametrize("change", ["added", "removed", "renamed"])
def test_an_image_added_removed_or_renamed_is_seen_at_the_next_start(tmp_path, monkeypatch, change):
    """Only the class folder that changed is listed again, and a store of the images before refuses them."""
    from bench.measures import random_store
    from mealv2.softlabels.store import StoreError

    split = make_image_folder(tmp_path, classes=3, per_class=4, mixed=False).resolve()
    _settled_after(monkeypatch, 0.05)
    first = load_index(split)
    store = random_store(tmp_path / "labels.zarr", first, res=32)
    folder = split / "class_1"
    if change == "added":
        os.link(folder / "img_000.jpg", folder / "img_000b.jpg")  # a hard link: the byte size and mtime of another
    elif change == "removed":
        (folder / "img_002.jpg").unlink()
    else:
        (folder / "img_002.jpg").rename(folder / "img_002b.jpg")
    listed = _spy(monkeypatch, "scandir", split)
    second = load_index(split)
    assert listed == [split, folder]
    expected = list(first.paths)
    if change == "added":
        expected.insert(expected.index("class_1/img_000.jpg") + 1, "class_1/img_000b.jpg")
    else:
        expected[expected.index("class_1/img_002.jpg")] = "class_1/img_002b.jpg"
        if change == "removed":
            expected.remove("class_1/img_002b.jpg")
    assert list(second.paths) == expected
    with pytest.raises(StoreError, match="fingerprint differs"):
        store.matching_index(split)


def test_an_index_cache_from_before_folder_stamps_is_read_and_then_trusted(tmp_path, monkeypatch):
    """A cache written before stamps and the saved fingerprint (format 2 without those arrays) still loads: the
    next start lists every folder once, reusing its headers, and the start after it lists none."""
    import mealv2.pipeline.dataset as dataset

    split = make_image_folder(tmp_path, classes=2, per_class=3, mixed=False).resolve()
    _settled_after(monkeypatch, 0.05)
    first = load_index(split)
    cache = dataset.default_cache_path(split)
    with np.load(cache) as arrays:
        before_stamps = {key: arrays[key] for key in arrays.files if key not in ("stamps", "fingerprint")}
    with open(cache, "wb") as handle:
        np.savez(handle, **before_stamps)
    listed = _spy(monkeypatch, "scandir", split)
    headers = []
    monkeypatch.setattr(dataset, "read_header", lambda path: headers.append(path) or (1, 1))
    assert load_index(split).fingerprint == first.fingerprint and headers == []
    assert listed == [split, split / "class_0", split / "class_1"]
    listed.clear()
    assert load_index(split).fingerprint == first.fingerprint and listed == [split]
