"""medflow.train.loader and patchset: whole-chunk reads equal the raw rows; rank sharding; determinism; dihedral
augmentation; class balancing; stratified batches; max_patches cap. Real shards via ShardWriter."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from medflow.bench.inputs import write_synthetic_cohort
from medflow.core import index as shards
from medflow.core.errors import InputError
from medflow.core.shards import SHARD_FORMAT
from medflow.train.augment import dihedral, dihedral_batch
from medflow.train.loader import EpochLoader
from medflow.train.patchset import PatchSet, row_segments

CLASSES = ["normal", "stroma", "tumour"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 patients, 9 shards of 16×16×3 uint8 patches, chunks of 8; labels imbalanced."""
    rng = np.random.default_rng(0)
    images = {}
    for i in range(9):
        n = int(rng.integers(15, 60))
        labels = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
        images[f"img{i}"] = (f"P{i % 6}", labels.tolist())
    root = tmp_path_factory.mktemp("cohort")
    index_path = write_synthetic_cohort(root, images, CLASSES, patch_shape=(16, 16, 3), chunk_patches=8)
    return shards.load_index(index_path)


def _raw(pset: PatchSet) -> tuple[np.ndarray, np.ndarray]:
    """The set's patches and labels read the plain way: whole datasets, in shard then row order."""
    xs, ys = [], []
    for shard in pset.shards:
        with h5py.File(shard["path"], "r") as h5:
            xs.append(h5["patches"][:])
            ys.append(h5["labels"][:])
    return np.concatenate(xs), np.concatenate(ys)


def test_patchset_selects_patients_in_shard_order(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P1", "P4", "P0"])
    assert [s["patient_id"] for s in pset.shards] == [
        s["patient_id"] for s in cohort["shards"] if s["patient_id"] in {"P0", "P1", "P4"}
    ]
    x, y = _raw(pset)
    assert len(pset) == len(y) and pset.labels.dtype == np.int64
    np.testing.assert_array_equal(pset.labels, y)
    assert pset.patch_shape == (16, 16, 3) and pset.dtype == np.uint8 and pset.class_names == CLASSES
    assert set(pset.patients()) == {"P0", "P1", "P4"}


def test_read_equals_raw_rows_in_idx_order(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P0", "P2", "P3", "P5"], cache_bytes=3 * 8 * 16 * 16 * 3)
    x, _ = _raw(pset)
    rng = np.random.default_rng(1)
    for _ in range(5):  # random order, with repeats, across shards and chunk boundaries
        idx = rng.integers(0, len(pset), size=37)
        np.testing.assert_array_equal(pset.read(idx), x[idx])
    np.testing.assert_array_equal(pset.read(np.arange(len(pset))[::-1]), x[::-1])
    assert pset.read(np.array([], dtype=np.int64)).shape == (0, 16, 16, 3)
    pset.preload()
    idx = rng.permutation(len(pset))
    np.testing.assert_array_equal(pset.read(idx), x[idx])


def test_reads_are_whole_chunks(cohort: dict) -> None:
    """A read touching k distinct chunks costs exactly k chunk reads (no per-row HDF5 calls)."""
    pset = PatchSet(cohort, ["P0"], cache_bytes=0, io="h5py")
    idx = np.arange(len(pset))
    before = pset.chunk_reads
    pset.read(idx)
    assert pset.chunk_reads - before == len(np.unique(pset.chunk_of))


def test_unknown_patient_is_input_error(cohort: dict) -> None:
    with pytest.raises(InputError, match="nobody"):
        PatchSet(cohort, ["P0", "nobody"])


def test_max_patches_cap_keeps_every_class(cohort: dict) -> None:
    full = PatchSet(cohort, ["P0", "P1", "P2"])
    capped = PatchSet(cohort, ["P0", "P1", "P2"], max_patches=20, seed=3)
    assert len(capped) == 20
    assert set(capped.labels) == set(full.labels)
    x, _ = _raw(full)
    # The kept rows are real rows of the set, in the set's order, and read correctly.
    keys_full = {(int(s), int(r)): i for i, (s, r) in enumerate(zip(full.shard_of, full.row_of))}
    pos = np.array([keys_full[(int(s), int(r))] for s, r in zip(capped.shard_of, capped.row_of)])
    assert np.all(np.diff(pos) > 0)
    np.testing.assert_array_equal(capped.read(np.arange(20)), x[pos])
    np.testing.assert_array_equal(capped.labels, full.labels[pos])
    again = PatchSet(cohort, ["P0", "P1", "P2"], max_patches=20, seed=3)
    np.testing.assert_array_equal(again.row_of, capped.row_of)


@pytest.mark.parametrize("preload", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_disjoint_equal_length_and_cover(cohort: dict, preload: bool, world_size: int) -> None:
    pset = PatchSet(cohort, ["P0", "P1", "P2", "P3"])
    loaders = [
        EpochLoader(pset, batch_size=7, rank=r, world_size=world_size, seed=5, preload=preload)
        for r in range(world_size)
    ]
    parts = [ld.rank_indices() for ld in loaders]
    assert len({len(p) for p in parts}) == 1 and len({len(ld) for ld in loaders}) == 1
    allidx = np.concatenate(parts)
    assert set(allidx) == set(range(len(pset)))  # every patch served
    pad = len(allidx) - len(pset)
    assert 0 <= pad < world_size  # only wrap-around padding repeats
    for ld, part in zip(loaders, parts):
        ys = [y.numpy() for _, y in ld]
        assert len(ys) == len(ld)
        np.testing.assert_array_equal(np.concatenate(ys), pset.labels[part])


def test_batches_carry_the_right_patches(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P1", "P2"])
    x_raw, _ = _raw(pset)
    loader = EpochLoader(pset, batch_size=8, seed=2, preload=False)
    idx = loader.rank_indices()
    got = np.concatenate([x.numpy() for x, _ in loader])
    np.testing.assert_array_equal(got, x_raw[idx])
    assert loader.stats["patches"] == len(pset) and loader.load_ms_per_patch > 0


def test_same_seed_same_epoch_same_batches_and_epochs_differ(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P0", "P3", "P4"])
    a = EpochLoader(pset, batch_size=8, seed=11, augment="dihedral", preload=False)
    b = EpochLoader(PatchSet(cohort, ["P0", "P3", "P4"]), batch_size=8, seed=11, augment="dihedral", preload=True)
    assert b.pset.preloaded and not a.pset.preloaded
    a.set_epoch(3)
    b.set_epoch(3)
    # The epoch plan never depends on where the bytes come from (RAM or the shards).
    np.testing.assert_array_equal(a._plan[0], b._plan[0])
    np.testing.assert_array_equal(a._plan[1], b._plan[1])
    for (xa, _), (xb, _) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
    a0 = a.rank_indices()
    a.set_epoch(4)
    assert not np.array_equal(a0, a.rank_indices())
    a.set_epoch(3)
    np.testing.assert_array_equal(a0, a.rank_indices())
    c = EpochLoader(pset, batch_size=8, seed=12, preload=False)
    c.set_epoch(3)
    assert not np.array_equal(a0, c.rank_indices())
    batches_a = [(x.numpy(), y.numpy()) for x, y in a]
    a.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(batches_a, a):
        np.testing.assert_array_equal(xa, xb.numpy())
        np.testing.assert_array_equal(ya, yb.numpy())


def test_unshuffled_loader_keeps_set_order(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P5"])
    loader = EpochLoader(pset, batch_size=4, shuffle=False)
    np.testing.assert_array_equal(loader.rank_indices(), np.arange(len(pset)))


def test_streaming_order_keeps_reads_whole_chunk(cohort: dict) -> None:
    """Shuffled streaming epochs read each chunk about once (chunk-grouped order)."""
    pset = PatchSet(cohort, ["P0", "P1", "P2", "P3", "P4", "P5"], cache_bytes=16 * 8 * 16 * 16 * 3, io="h5py")
    loader = EpochLoader(pset, batch_size=16, seed=0, preload=False, window_chunks=4)
    for _ in loader:
        pass
    n_chunks = len(np.unique(pset.chunk_of))
    assert pset.chunk_reads <= n_chunks + 2


def test_dihedral_transforms_are_the_8_distinct_pixel_permutations() -> None:
    x = np.arange(4 * 4 * 2).reshape(4, 4, 2)
    outs = [dihedral(x, t) for t in range(8)]
    np.testing.assert_array_equal(outs[0], x)
    assert len({o.tobytes() for o in outs}) == 8
    for o in outs:  # a permutation of pixels: channels travel together, values preserved
        assert sorted(map(tuple, o.reshape(-1, 2))) == sorted(map(tuple, x.reshape(-1, 2)))
    np.testing.assert_array_equal(outs[1], np.rot90(x))
    np.testing.assert_array_equal(outs[4], x[:, ::-1])
    np.testing.assert_array_equal(outs[5], np.rot90(x)[:, ::-1])
    batch = np.stack([x] * 8)
    np.testing.assert_array_equal(dihedral_batch(batch, np.arange(8)), np.stack(outs))


def test_augment_applies_the_planned_transform(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P2"])
    x_raw, _ = _raw(pset)
    loader = EpochLoader(pset, batch_size=5, seed=4, augment="dihedral")
    idx, tf = loader._plan
    got = np.concatenate([x.numpy() for x, _ in loader])
    assert len(set(tf.tolist())) > 1
    expected = np.stack([dihedral(x_raw[i], int(t)) for i, t in zip(idx, tf)])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("augment", ["none", "dihedral"])
def test_dihedral_balance_oversamples_with_distinct_transforms(cohort: dict, augment: str) -> None:
    pset = PatchSet(cohort, ["P0", "P1", "P2", "P3"])
    counts = pset.class_counts()
    loader = EpochLoader(pset, batch_size=8, seed=6, balance="dihedral", augment=augment)
    idx, tf = loader._plan
    got = np.bincount(pset.labels[idx], minlength=3)
    np.testing.assert_array_equal(got, np.minimum(counts.max(), 8 * counts))
    pairs = set(zip(idx.tolist(), tf.tolist()))
    assert len(pairs) == len(idx)  # no patch repeats a transform
    if augment == "none":  # every original patch once untransformed
        assert {i for i, t in pairs if t == 0} == set(range(len(pset)))


def test_weighted_balance_samples_classes_about_equally(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P0", "P1", "P2", "P3", "P4", "P5"])
    loader = EpochLoader(pset, batch_size=8, seed=0, balance="weighted")
    shares = np.bincount(pset.labels[loader.rank_indices()], minlength=3) / len(pset)
    assert len(loader.rank_indices()) == len(pset)
    assert np.all(np.abs(shares - 1 / 3) < 0.08), shares  # vs raw shares ~0.6/0.25/0.15


@pytest.mark.parametrize("world_size", [1, 2])
def test_stratified_batches_keep_class_proportions(cohort: dict, world_size: int) -> None:
    pset = PatchSet(cohort, ["P0", "P1", "P2", "P3", "P4", "P5"])
    props = pset.class_counts() / len(pset)
    B = 20
    for rank in range(world_size):
        loader = EpochLoader(
            pset, batch_size=B, rank=rank, world_size=world_size, seed=1, sampling="stratified", drop_last=True
        )
        for _, y in loader:
            counts = np.bincount(y.numpy(), minlength=3)
            assert np.all(np.abs(counts - props * B) <= 1.5), (counts, props * B)


def test_drop_last_and_lengths(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P0", "P1"])
    n = len(pset)
    full = EpochLoader(pset, batch_size=7, world_size=2, rank=1)
    dropped = EpochLoader(pset, batch_size=7, world_size=2, rank=1, drop_last=True)
    per_rank = -(-n // 2)
    assert len(full) == -(-per_rank // 7) and len(dropped) == per_rank // 7
    assert all(len(y) == 7 for _, y in dropped)


def test_float16_shards_come_out_float32(tmp_path: Path) -> None:
    images = {"h0": ("A", [0, 1] * 10), "h1": ("B", [1, 0] * 6)}
    index = shards.load_index(
        write_synthetic_cohort(
            tmp_path, images, ["normal", "tumour"], patch_shape=(5, 5, 12), dtype="float16", kind="hsi", chunk_patches=4
        )
    )
    pset = PatchSet(index, ["A", "B"])
    x, _ = _raw(pset)
    loader = EpochLoader(pset, batch_size=6, shuffle=False, preload=False)
    got = np.concatenate([xb.numpy() for xb, _ in loader])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))


@pytest.mark.parametrize("io", ["auto", "h5py"])
@pytest.mark.parametrize("mode", [{"workers": 2}, {"prefetch": 3}])
def test_workers_and_prefetch_give_the_same_batches(cohort: dict, io: str, mode: dict) -> None:
    pset = PatchSet(cohort, ["P0", "P1", "P2"], io=io)
    single = EpochLoader(pset, batch_size=8, seed=9, augment="dihedral", preload=False)
    other = EpochLoader(
        PatchSet(cohort, ["P0", "P1", "P2"], io=io), batch_size=8, seed=9, augment="dihedral", preload=False, **mode
    )
    for epoch in (0, 1):
        single.set_epoch(epoch)
        other.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(single, other, strict=True):
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    assert other.stats["patches"] == 2 * len(single.rank_indices())


# ---- storage paths: memory-mapped segments vs h5py whole chunks ---------------------------------
@pytest.fixture(scope="module")
def mixed_cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two plain shards, a gzip one, and one written by another tool with its chunks stored in
    reverse order (so its rows map to many separate segments)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(3)
    plain = {"big": ("A", rng.integers(0, 2, size=300).tolist()), "small": ("B", [0, 1] * 20)}
    write_synthetic_cohort(
        root / "plain", plain, ["normal", "tumour"], patch_shape=(6, 6, 3), chunk_patches=16, cohort="mixed"
    )
    _write_reversed_shard(root / "plain" / "shards" / "reversed.h5", rng)
    write_synthetic_cohort(
        root / "gz",
        {"packed": ("C", [1, 0, 0] * 15)},
        ["normal", "tumour"],
        patch_shape=(6, 6, 3),
        chunk_patches=16,
        cohort="mixed",
        compression="gzip",
        seed=1,
    )
    records = sorted(root.glob("*/shards/*.record.json"))
    shards.build_index(records, root / "index.json", "mixed", "wsi")
    return shards.load_index(root / "index.json")


def _write_reversed_shard(path: Path, rng: np.random.Generator) -> None:
    n, c = 50, 4
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("patches", shape=(n, 6, 6, 3), dtype="uint8", chunks=(c, 6, 6, 3))
        x = rng.integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8)
        for start in reversed(range(0, n, c)):  # last chunk allocated first
            ds[start : start + c] = x[start : start + c]
        h5["coords"] = np.zeros((n, 2), np.int64)
        h5["labels"] = rng.integers(0, 2, size=n)
        h5.attrs.update(
            {
                "format": SHARD_FORMAT,
                "kind": "wsi",
                "image_id": "reversed",
                "patient_id": "D",
                "cohort": "mixed",
                "class_names": '["normal", "tumour"]',
            }
        )
    fsio_record = path.with_name("reversed.record.json")
    fsio_record.write_text('{"status": "ok", "shard": "reversed.h5", "image_id": "reversed", "patient_id": "D"}')


def test_row_segments_cover_every_row(mixed_cohort: dict) -> None:
    for shard in mixed_cohort["shards"]:
        with h5py.File(shard["path"], "r") as h5:
            segs = row_segments(h5["patches"])
            if shard["image_id"] == "packed":
                assert segs is None  # gzip: not mappable
                continue
            assert segs is not None
            assert [s[0] for s in segs] == sorted(s[0] for s in segs)
            assert sum(s[1] for s in segs) == shard["n"] and segs[0][0] == 0
            if shard["image_id"] == "reversed":
                assert len(segs) == 13  # one segment per out-of-order chunk


def test_mmap_and_h5py_paths_read_the_same_rows(mixed_cohort: dict) -> None:
    auto = PatchSet(mixed_cohort, ["A", "B", "C", "D"])
    plain = PatchSet(mixed_cohort, ["A", "B", "C", "D"], io="h5py")
    x, _ = _raw(plain)
    assert auto.mapped_fraction == pytest.approx(1 - 45 / len(auto)) and plain.mapped_fraction == 0.0
    rng = np.random.default_rng(0)
    for idx in (rng.permutation(len(auto))[:300], np.sort(rng.integers(0, len(auto), 200)), np.arange(len(auto))):
        np.testing.assert_array_equal(auto.read(idx), x[idx])
        np.testing.assert_array_equal(plain.read(idx), x[idx])
    with pytest.raises(InputError, match="compressed"):
        PatchSet(mixed_cohort, ["C"], io="mmap")


def test_compressed_sets_use_chunk_windows_and_read_each_chunk_once(mixed_cohort: dict) -> None:
    pset = PatchSet(mixed_cohort, ["C"], cache_bytes=0)
    loader = EpochLoader(pset, batch_size=8, seed=1)
    assert loader.window_chunks > 0  # never a global shuffle through h5py
    for _ in loader:
        pass
    assert pset.chunk_reads == len(np.unique(pset.chunk_of))


def test_patchset_pickles_for_spawned_workers(mixed_cohort: dict) -> None:
    import pickle

    pset = PatchSet(mixed_cohort, ["A", "C"])
    idx = np.arange(0, len(pset), 7)
    before = pset.read(idx)
    clone = pickle.loads(pickle.dumps(pset))
    np.testing.assert_array_equal(clone.read(idx), before)
    pset.close()
    np.testing.assert_array_equal(pset.read(idx), before)  # reopens lazily after close


def test_loader_batches_are_in_storage_order_within_each_batch(mixed_cohort: dict) -> None:
    pset = PatchSet(mixed_cohort, ["A", "B", "C", "D"])
    loader = EpochLoader(pset, batch_size=32, seed=0, preload=False)
    idx = loader.rank_indices()
    for lo in range(0, len(idx), 32):
        b = idx[lo : lo + 32]
        np.testing.assert_array_equal(b, b[pset.sort_for_read(b)])


def test_batch_buffers_are_reused_only_when_released(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P0", "P1", "P2", "P3"])
    x_raw, _ = _raw(pset)
    loader = EpochLoader(pset, batch_size=8, seed=3, augment="dihedral", drop_last=True)
    for x, _ in loader:  # a training loop: the previous batch is dropped as the next comes
        del x
    assert len(loader._buffers._arrays) <= 4
    kept = [(x, y) for x, y in loader]  # a caller keeping every batch: nothing may be overwritten
    idx, tf = loader._plan
    expected = np.stack([dihedral(x_raw[i], int(t)) for i, t in zip(idx, tf)])
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in kept]), expected)
    assert len({x.data_ptr() for x, _ in kept}) == len(kept)


def test_iter_batches_covers_the_set_in_order(cohort: dict) -> None:
    pset = PatchSet(cohort, ["P3", "P4"])
    x_raw, _ = _raw(pset)
    parts = list(pset.iter_batches(10))
    np.testing.assert_array_equal(np.concatenate([p for p, _ in parts]), np.arange(len(pset)))
    np.testing.assert_array_equal(np.concatenate([x for _, x in parts]), x_raw)
    sub = np.array([5, 1, 7])
    ((pos, x),) = list(pset.iter_batches(8, sub))
    np.testing.assert_array_equal(pos, sub)
    np.testing.assert_array_equal(x, x_raw[sub])
    with pytest.raises(IndexError):
        pset.read(np.array([len(pset)]))
