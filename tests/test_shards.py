"""Crop shards: written and read with ``tarfile``, in webdataset's format, byte-identical across runs."""

from __future__ import annotations

import functools
import gc
import io
import json
import re
import tarfile
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from conftest import contract_types
from PIL import Image

from mcf.data.pretrain_data import CropDataset
from mcf.data.shards import (
    decode_jpeg,
    encode_jpeg,
    iter_encoded,
    iter_samples,
    read_back,
    shard_urls,
    write_manifest,
    write_shards,
)
from mcf.errors import StageError


def _samples(n: int) -> list[tuple[str, bytes, dict]]:
    rng = np.random.default_rng(0)
    return [
        (f"img-{i:04d}_000", encode_jpeg(rng.integers(0, 256, (8 + i, 8 + i, 3), dtype=np.uint8)), {"i": i})
        for i in range(n)
    ]


def test_round_trip_splits_at_shard_size_and_is_byte_stable(tmp_path: Path) -> None:
    samples = _samples(5)
    names = ["crops-000000.tar", "crops-000001.tar", "crops-000002.tar"]
    assert write_shards(samples, tmp_path / "a", 2) == names
    assert list(iter_encoded(shard_urls(tmp_path / "a"))) == samples
    write_shards(iter(samples), tmp_path / "b", 2)  # a generator, as the stages pass them
    for name in ("crops-000000.tar", "crops-000002.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "crops-000000.tar") as tar:
        info = tar.getmembers()[0]
        assert (info.name, info.mtime, info.mode, info.uname) == ("img-0000_000.jpg", 0, 0o444, "")
        assert [m.name for m in tar.getmembers()][1] == "img-0000_000.json"
    keys, rgbs, metas = zip(*iter_samples(shard_urls(tmp_path / "a")), strict=True)
    assert keys == tuple(s[0] for s in samples) and metas == tuple(s[2] for s in samples)
    assert rgbs[4].shape == (12, 12, 3) and rgbs[4].dtype == np.uint8


def test_webdataset_reads_them_as_we_do(tmp_path: Path) -> None:
    samples = _samples(3)
    write_shards(samples, tmp_path, 2)
    theirs = list(wds.WebDataset(shard_urls(tmp_path), shardshuffle=False).decode("rgb8"))
    ours = list(iter_samples(shard_urls(tmp_path)))
    assert [s["__key__"] for s in theirs] == [key for key, _, _ in ours]
    for t, (_, rgb, meta) in zip(theirs, ours, strict=True):
        assert np.array_equal(t["jpg"], rgb) and t["json"] == meta
    stats = read_back(tmp_path)
    assert stats["shard"].tolist() == ["crops-000000.tar"] * 2 + ["crops-000001.tar"]
    assert stats["width"].tolist() == [8, 9, 10] and stats["mean"].iloc[0] == pytest.approx(ours[0][1].mean())


def test_read_back_on_several_processes_is_the_serial_read_back(tmp_path: Path) -> None:
    """The crop and subset stages read their shards back on ``workers`` processes (20M crops take hours
    on one core); the table is the same, in shard order."""
    write_shards(_samples(7), tmp_path, 2)
    serial = read_back(tmp_path)
    assert serial["shard"].nunique() == 4
    pd.testing.assert_frame_equal(read_back(tmp_path, workers=3), serial)


def test_no_samples_is_one_empty_shard_and_bad_input_is_named(tmp_path: Path) -> None:
    assert write_shards([], tmp_path / "empty", 4) == ["crops-000000.tar"]
    assert list(iter_encoded(shard_urls(tmp_path / "empty"))) == [] and read_back(tmp_path / "empty").empty
    with pytest.raises(ValueError, match="shard_size must be at least 1"):
        write_shards([], tmp_path / "zero", 0)
    with pytest.raises(StageError, match="no crops-"):  # one line from the CLI, not a traceback
        shard_urls(tmp_path / "zero")
    broken = tmp_path / "broken" / "crops-000000.tar"
    broken.parent.mkdir()
    with tarfile.open(broken, "w") as tar:  # a jpg without its json
        data = json.dumps({}).encode()
        info = tarfile.TarInfo("k.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(StageError, match="sample 'k' lacks a jpg or json member"):
        list(iter_encoded(str(broken)))


def test_damaged_shards_and_crops_fail_naming_them(tmp_path: Path) -> None:
    rgb = np.full((8, 8, 3), 128, np.uint8)
    samples = [(f"c{i}", encode_jpeg(rgb), {"crop_id": f"c{i}"}) for i in range(3)]
    write_shards(samples, tmp_path / "ok", 10)
    shard = tmp_path / "ok" / "crops-000000.tar"
    cut = tmp_path / "cut" / "crops-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(shard.read_bytes()[:700])  # a copy that stopped half way through the first member
    with pytest.raises(StageError, match=r"cut/crops-000000.tar: not a readable crop shard"):
        list(iter_encoded(str(cut)))
    with pytest.raises(StageError, match=r"cut/crops-000000.tar: not a readable crop shard"):
        CropDataset(cut.parent, 8, cache_mb=0)
    write_shards([("c0", b"no jpeg here", {"crop_id": "c0"})], tmp_path / "junk", 10)
    with pytest.raises(StageError, match="crop c0: not a decodable image"):
        list(iter_samples(shard_urls(tmp_path / "junk")))
    with pytest.raises(StageError, match=r"^crop c0 in \S*junk/crops-000000.tar: not a decodable image"):
        CropDataset(tmp_path / "junk", 8, cache_mb=1)  # by its crop_id, as the stages name it, not its offset
    shard = tmp_path / "junk" / "crops-000000.tar"  # its json member's bytes damaged in place
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'{"crop_id": "c0"}', b'\xff"crop_id": "c0"}'))
    with pytest.raises(StageError, match=r"junk/crops-000000.tar: sample 'c0': json member is not JSON"):
        read_back(tmp_path / "junk")


@pytest.mark.parametrize("member", [1, 2, 3])  # cut inside a later member's header, its data, after it
def test_shard_cut_after_its_first_member_fails_rather_than_losing_crops(tmp_path: Path, member: int) -> None:
    """tarfile stops quietly at a cut after the first header, so a half-copied shard trained on fewer
    crops (pretrain, teacher) without a word; the missing end-of-archive marker gives it away."""
    write_shards(_samples(3), tmp_path / "ok", 10)
    data = (tmp_path / "ok" / "crops-000000.tar").read_bytes()
    with tarfile.open(tmp_path / "ok" / "crops-000000.tar") as tar:
        infos = tar.getmembers()
    ends = {1: infos[2].offset + 100, 2: infos[2].offset_data + 10, 3: infos[3].offset_data + 512}
    cut = tmp_path / "cut" / "crops-000000.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: ends[member]])
    with pytest.raises(StageError, match=r"cut/crops-000000.tar: not a readable crop shard"):
        list(iter_encoded(str(cut)))
    with pytest.raises(StageError, match=r"cut/crops-000000.tar: not a readable crop shard"):
        CropDataset(cut.parent, 8, cache_mb=0)


def test_training_on_an_empty_shard_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subset whose shards/ folder was emptied: exit 1 and a line naming it, not a FileNotFoundError."""
    import yaml

    from mcf import cli

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    (tmp_path / "subset" / "shards").mkdir(parents=True)
    params["teacher"] |= {"source": "train", "data": "subset", "out": "teacher", "resume_dir": "resume"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["teacher", "--params", "p.yaml"]) == 1
    assert "mcf teacher: no crops-*.tar shards in subset/shards" in capsys.readouterr().err


def _python_objects(root: object) -> int:
    """Python objects reachable from ``root``; a NumPy array is one, whatever its length."""
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) not in seen and not isinstance(obj, type | types.ModuleType):
            seen.add(id(obj))
            stack.extend(gc.get_referents(obj))
    return len(seen)


def test_crop_index_holds_no_python_object_per_crop(tmp_path: Path) -> None:
    """A DataLoader worker forked from the training process copies every Python object it reads (it
    writes the reference count): a tuple per crop was 2.5 GiB at 20M crops, copied into each worker at
    every epoch. The index is arrays, so the objects it holds do not grow with the crops."""
    rgb = np.full((8, 8, 3), 128, np.uint8)
    counts = []
    for n in (3, 30):
        write_shards([(f"c{i}", encode_jpeg(rgb), {}) for i in range(n)], tmp_path / str(n), 100)
        crops = CropDataset(tmp_path / str(n), 8, cache_mb=0)
        assert len(crops) == n and crops[n - 1].shape == (3, 8, 8)
        counts.append(_python_objects(crops))
    assert counts[0] == counts[1]


def _sparse_member(name: str, stored: bytes, real_size: int) -> bytes:
    """A GNU sparse member (``tarfile`` reads them, cannot write them): ``stored`` bytes at offset 0, then
    a hole of zeros up to ``real_size``, which ``tarfile`` fills in memory when the member is read."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, len(stored)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = b"%011o\0%011o\0" % (0, len(stored))  # the first sparse map entry
    header[483:495] = b"%011o\0" % real_size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    pad = -len(stored) % tarfile.BLOCKSIZE
    return bytes(header) + stored + tarfile.NUL * pad


@pytest.mark.parametrize("kind", ["gzip", "gnu-sparse", "pax-sparse"])
def test_a_shard_that_inflates_on_reading_is_refused(tmp_path: Path, kind: str) -> None:
    """A shard is plain tar (docs/CONTRACTS.md), and pre-training reads its members at their raw byte
    offsets. ``tarfile.open``'s default mode also took a gzip/bz2/xz file, and ``isfile()`` a GNU or PAX
    sparse member, both of which inflate while read into memory: a kilobyte-sized file could declare
    gigabytes of crop (crop and subset read every member whole) and exhaust the machine before any check.
    Pre-training's index refuses them too: it read a sparse member's expanded size from its raw offset,
    past its stored bytes into the next headers, where crop and subset had read zeros."""
    samples = _samples(1)
    write_shards(samples, tmp_path / "ok", 10)
    plain = (tmp_path / "ok" / "crops-000000.tar").read_bytes()
    shard = tmp_path / "bad" / "crops-000000.tar"
    shard.parent.mkdir()
    if kind == "gzip":
        with tarfile.open(shard, "w:gz") as tar, tarfile.open(tmp_path / "ok" / "crops-000000.tar") as src:
            for info in src:
                tar.addfile(info, src.extractfile(info))
    elif kind == "pax-sparse":  # a regular member's type, its hole declared in a PAX header
        key, jpeg, meta = samples[0]
        info = tarfile.TarInfo(f"{key}.jpg")
        info.size = len(jpeg)
        info.pax_headers = {"GNU.sparse.map": f"0,{len(jpeg)}", "GNU.sparse.size": str(len(jpeg) + 4096)}
        with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(jpeg))
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(json.dumps(meta))
            tar.addfile(info, io.BytesIO(json.dumps(meta).encode()))
    else:
        key, jpeg, meta = samples[0]
        member = _sparse_member(f"{key}.jpg", jpeg, len(jpeg) + 4096)
        with tarfile.open(shard, "w") as tar:  # the json member, after the crafted jpg member
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(json.dumps(meta))
            tar.addfile(info, io.BytesIO(json.dumps(meta).encode()))
        shard.write_bytes(member + shard.read_bytes())
    if kind != "gzip":
        with tarfile.open(shard) as tar:  # tarfile reads it, holes and all
            assert len(tar.extractfile(tar.getmembers()[0]).read()) == len(jpeg) + 4096
    assert plain != shard.read_bytes()
    with pytest.raises(StageError, match=r"bad/crops-000000.tar: not a readable crop shard"):
        list(iter_encoded(str(shard)))
    with pytest.raises(StageError, match=r"bad/crops-000000.tar: not a readable crop shard"):
        CropDataset(shard.parent, 8, cache_mb=0)  # the index pre-training reads at raw offsets, too


def test_a_crop_that_declares_too_many_pixels_fails_naming_it(tmp_path: Path) -> None:
    """Pillow refuses to open an image whose header declares over 2 × MAX_IMAGE_PIXELS with a
    DecompressionBombError, which is no OSError: a crop of a damaged or foreign shard whose JPEG header
    says 65535 × 65535 escaped as that traceback from crop, subset and pretrain rather than one line."""
    jpeg = bytearray(encode_jpeg(np.full((8, 8, 3), 128, np.uint8)))
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height, width
    jpeg[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"
    write_shards([("c0", bytes(jpeg), {"crop_id": "c0"})], tmp_path / "bomb", 10)
    with pytest.raises(StageError, match=r"crop c0: not a decodable image \(DecompressionBombError: "):
        list(iter_samples(shard_urls(tmp_path / "bomb")))
    with pytest.raises(StageError, match=r"bomb/crops-000000.tar.*: not a decodable image \(Decompression"):
        CropDataset(tmp_path / "bomb", 8, cache_mb=1)


def test_indexing_the_shards_shows_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """pretrain and teacher index every shard header first: at the paper's 20M crops, 2,000 shards of
    10,000, that read ran for many minutes on each rank without a word (about 75 µs a crop here)."""
    from mcf.data import pretrain_data

    write_shards(_samples(5), tmp_path / "shards", shard_size=2)
    monkeypatch.setattr(pretrain_data, "tqdm", functools.partial(pretrain_data.tqdm, disable=False))
    pretrain_data.index_shards(tmp_path / "shards")
    err = capsys.readouterr().err
    assert "index shards:" in err and "0/3 " in err  # a bar over the 3 shards


def _append_member(shard: Path, name: str) -> None:
    """A black 8×8 JPEG appended to ``shard`` as ``name`` (``tar -r``)."""
    jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    info = tarfile.TarInfo(name)
    info.size = len(jpeg)
    with tarfile.open(shard, "a") as tar:
        tar.addfile(info, io.BytesIO(jpeg))


def test_the_index_counts_the_jpg_members_webdataset_reads(tmp_path: Path) -> None:
    """Pre-training's index splits a member name as webdataset and the stages' reader do: ``c0.seg.jpg``
    is sample c0's ``seg.jpg``, not a crop of its own (ending in .jpg made it one, trained on twice)."""
    from mcf.data import pretrain_data

    write_shards(_samples(2), tmp_path / "shards", shard_size=10)
    shard = tmp_path / "shards" / "crops-000000.tar"
    _append_member(shard, "img-0001_000.seg.jpg")  # the last sample's, as webdataset groups members
    read = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert sum("jpg" in sample for sample in read) == 2 and any("seg.jpg" in sample for sample in read)
    assert len(pretrain_data.index_shards(tmp_path / "shards")[1]) == 2


def test_a_member_written_twice_in_a_shard_is_refused(tmp_path: Path) -> None:
    """A shard with a crop appended again (``tar -r``, tarfile's ``"a"`` mode): the stages' reader kept the
    last of the two jpg members, so read_back reported one crop with the second one's statistics, while
    pre-training's index trained on both; webdataset refuses such a shard ("duplicate file name")."""
    rgb = np.full((8, 8, 3), 128, np.uint8)
    write_shards([("c0", encode_jpeg(rgb), {"crop_id": "c0"})], tmp_path / "dup", 10)
    shard = tmp_path / "dup" / "crops-000000.tar"
    _append_member(shard, "c0.jpg")
    with pytest.raises(ValueError, match="duplicate file name"):
        list(wds.WebDataset(str(shard), shardshuffle=False))
    message = r"dup/crops-000000.tar: not a readable crop shard \(ReadError: member 'c0.jpg' occurs twice"
    with pytest.raises(StageError, match=message):
        read_back(tmp_path / "dup")
    with pytest.raises(StageError, match=message):
        CropDataset(tmp_path / "dup", 8, cache_mb=0)


def _write_tar(path: Path, members: list[tuple[str, bytes | None]]) -> None:
    """A plain tar at ``path`` of ``(name, data)`` members in order; ``None`` data is a folder member."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shard_urls_are_the_crop_shards_alone(tmp_path: Path) -> None:
    """Only ``crops-*.tar`` files are shards: another tar left in the folder (a backup, a download) would
    be read as crops by every stage after it and by pre-training."""
    write_shards(_samples(3), tmp_path, 1)
    (tmp_path / "backup.tar").write_bytes((tmp_path / "crops-000000.tar").read_bytes())
    assert shard_urls(tmp_path) == [str(tmp_path / f"crops-{i:06d}.tar") for i in range(3)]


def test_a_shard_with_folder_members_reads_as_webdataset_reads_it(tmp_path: Path) -> None:
    """A shard made with ``tar -cf`` from folders holds the folders as members and keys each crop by its
    path: webdataset skips the folder members and reads ``a/c0`` and ``b/c0`` as two samples. Taking a
    folder member for a crop failed the read (no extension); keying by file name alone merged the two."""
    jpegs = [encode_jpeg(np.full((8, 8, 3), v, np.uint8)) for v in (40, 200)]
    shard = tmp_path / "shards" / "crops-000000.tar"
    _write_tar(shard, [("a", None), ("a/c0.jpg", jpegs[0]), ("a/c0.json", b'{"i": 0}'),
                       ("b", None), ("b/c0.jpg", jpegs[1]), ("b/c0.json", b'{"i": 1}')])
    read = wds.WebDataset(str(shard), shardshuffle=False)
    theirs = [(sample["__key__"], sample["jpg"], json.loads(sample["json"])) for sample in read]
    assert [key for key, _, _ in theirs] == ["a/c0", "b/c0"]
    assert list(iter_encoded(str(shard))) == theirs
    crops = CropDataset(shard.parent, 8, cache_mb=0)
    assert len(crops) == 2 and crops[0].float().mean() < 100 < crops[1].float().mean()


@pytest.mark.parametrize(("members", "message"), [
    ([("k.json", b"{}")], r"sample 'k' lacks a jpg or json member \(has \['json'\]\)"),
    ([("k.jpg", b"x"), ("k.json", b"{}"), ("k", b"x")], r"member 'k' has no extension"),
    ([("k.jpg", b"x"), ("k.json", b"not json")], r"sample 'k': json member is not JSON"),
])
def test_a_malformed_sample_of_a_foreign_shard_is_one_line(
    tmp_path: Path, members: list[tuple[str, bytes | None]], message: str
) -> None:
    """A shard written elsewhere may break the sample schema (docs/CONTRACTS.md): a json without its jpg
    was a KeyError, a member with no extension went into the sample unread, and a json member that is
    ASCII but not JSON was a JSONDecodeError; each is a StageError naming the shard."""
    shard = tmp_path / "crops-000000.tar"
    _write_tar(shard, members)
    with pytest.raises(StageError, match=rf"^{re.escape(str(shard))}: {message}"):
        list(iter_encoded(str(shard)))


@pytest.mark.parametrize("damage", ["zero-filled", "jpg-only"])
def test_pretraining_refuses_a_sample_the_stages_refuse(tmp_path: Path, damage: str) -> None:
    """A shard whose tail is zeros (a copy preallocated and cut short, a file a crash left zero-filled) ends
    quietly for tarfile at the first zero header, and a foreign shard may hold a crop without its json. The
    stages' reader refuses the sample left without its json; pre-training's index, counting jpg members
    alone, trained on the crops before the zeros (3 of 6 here) or on the lone jpg without a word."""
    write_shards(_samples(6), tmp_path / "shards", 10)
    shard = tmp_path / "shards" / "crops-000000.tar"
    with tarfile.open(shard) as tar:
        infos = tar.getmembers()
        members = [(info.name, tar.extractfile(info).read()) for info in infos]
    if damage == "zero-filled":  # from inside the 3rd crop's jpg data on, as long as the shard was
        data = shard.read_bytes()
        cut = infos[4].offset_data + tarfile.BLOCKSIZE
        shard.write_bytes(data[:cut] + bytes(len(data) - cut))
    else:
        _write_tar(shard, [(name, data) for name, data in members if name != "img-0002_000.json"])
    message = rf"^{re.escape(str(shard))}: sample 'img-0002_000' lacks a jpg or json member \(has \['jpg'\]\)"
    with pytest.raises(StageError, match=message):
        list(iter_encoded(str(shard)))
    with pytest.raises(StageError, match=message):
        CropDataset(shard.parent, 8, cache_mb=0)


@pytest.mark.parametrize("change", ["a copy", "a shard gone", "zeros from a sample on", "last emptied"])
def test_pretraining_refuses_shards_that_disagree_with_their_manifest(tmp_path: Path, change: str) -> None:
    """Shards a copy, a partial `dvc pull` or a crash changed after the stage wrote them, each still a
    well-formed tar: a copy beside them (crops-000000 copy.tar) matched crops-*.tar and was trained on
    twice, a shard gone left the rest to train on, and zeros from a sample's first header on end a tar
    cleanly. The manifest beside the shards says how many crops each holds: pre-training checks it."""
    shards = tmp_path / "subset" / "shards"
    names = write_shards(_samples(6), shards, 2)
    manifest = {"crop_id": [f"img-{i:04d}_000" for i in range(6)], "shard": [names[i // 2] for i in range(6)]}
    pd.DataFrame(manifest).to_parquet(tmp_path / "subset" / "manifest.parquet")
    assert len(CropDataset(shards, 8, cache_mb=0)) == 6
    first = shards / names[0]
    if change == "a copy":
        (shards / "crops-000000 copy.tar").write_bytes(first.read_bytes())
        expected = "crops-000000 copy.tar holds 2 crops, the manifest lists 0"
    elif change == "a shard gone":
        (shards / names[1]).unlink()
        expected = "crops-000001.tar holds 0 crops, the manifest lists 2"
    elif change == "last emptied":  # no crop counted for it: the tally still names it
        tarfile.open(shards / names[-1], "w").close()
        expected = "crops-000002.tar holds 0 crops, the manifest lists 2"
    else:
        with tarfile.open(first) as tar:
            cut = tar.getmembers()[2].offset  # the second sample's first header
        data = first.read_bytes()
        first.write_bytes(data[:cut] + bytes(len(data) - cut))
        expected = "crops-000000.tar holds 1 crops, the manifest lists 2"
    with pytest.raises(StageError, match=re.escape(f"{shards}: {expected}")):
        CropDataset(shards, 8, cache_mb=0)


def test_a_greyscale_jpeg_crop_is_read_as_rgb(tmp_path: Path) -> None:
    """A crop is RGB wherever it is read: a greyscale JPEG (a foreign shard's; ``mcf predict``'s input also
    goes through decode_jpeg) decoded to ``[H, W]``, which pre-training's ``[3, S, S]`` permute refused with
    a traceback."""
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 240, 30, dtype=np.uint8), (8, 1))).save(buf, format="JPEG")
    write_shards([("c0", buf.getvalue(), {})], tmp_path, 10)
    (_, rgb, _), = iter_samples(shard_urls(tmp_path))
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    crop = CropDataset(tmp_path, 8, cache_mb=0)[0]
    assert crop.shape == (3, 8, 8) and torch.equal(crop, torch.from_numpy(rgb.copy()).permute(2, 0, 1))


def test_read_back_gives_width_and_height_apart_and_numpys_std(tmp_path: Path) -> None:
    """The gates check width and height each against ``crop.size`` (docs/CONTRACTS.md); with square crops
    a swap of the two passed unseen. ``std`` is the population standard deviation of the decoded pixels."""
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # 6 high, 10 wide
    write_shards([("c0", encode_jpeg(rgb), {})], tmp_path, 10)
    (_, decoded, _), = iter_samples(shard_urls(tmp_path))
    row = read_back(tmp_path).iloc[0]
    assert (row["width"], row["height"]) == (10, 6)
    assert row["mean"] == pytest.approx(decoded.mean(), rel=1e-12)
    assert row["std"] == pytest.approx(decoded.std(), rel=1e-12)


def test_a_manifest_with_every_column_null_keeps_its_documented_types(tmp_path: Path) -> None:
    """A crop run that keeps nothing leaves every read-back column null, and faces rejected before cropping
    leave blur and phash null too: pandas would write such columns with Arrow's null type, which the gate
    and pandas readers take for another type. Each is written as docs/CONTRACTS.md types it."""
    documented = contract_types("crop: `manifest.parquet`")
    row = dict.fromkeys(documented) | {"crop_id": "a_000", "sample_id": "a", "face": 0, "status": "rejected"}
    write_manifest(pd.DataFrame([row]), tmp_path / "manifest.parquet")
    schema = pq.read_schema(tmp_path / "manifest.parquet")
    assert {name: str(schema.field(name).type) for name in schema.names} == documented


def test_a_shard_whose_file_is_gone_is_one_line(tmp_path: Path) -> None:
    """A shard that is a dangling link (DVC's symlink cache after ``dvc gc``) was a FileNotFoundError
    traceback from the stages' reader and pre-training's index; it is a StageError naming the shard."""
    (tmp_path / "crops-000000.tar").symlink_to(tmp_path / "gone.tar")
    message = r"crops-000000.tar: not a readable crop shard \(FileNotFoundError"
    with pytest.raises(StageError, match=message):
        list(iter_encoded(shard_urls(tmp_path)))
    with pytest.raises(StageError, match=message):
        CropDataset(tmp_path, 8, cache_mb=0)


# shards.py mutation-testing gaps


def test_every_member_has_no_owner_mtime_0_and_mode_0444(tmp_path: Path) -> None:
    """docs/CONTRACTS.md: members have mtime 0, mode 0444 and no owner, so the same crops give
    byte-identical shards on any machine (DVC hashes them); a uid or group name set passed unseen."""
    write_shards(_samples(3), tmp_path, 2)
    for url in shard_urls(tmp_path):
        with tarfile.open(url) as tar:
            for info in tar.getmembers():
                assert info.isfile() and (info.mtime, info.mode) == (0, 0o444), info.name
                assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", ""), info.name


def test_encode_jpeg_uses_the_quality_it_is_given() -> None:
    """The crop stage encodes at ``crop.jpeg_quality`` through encode_jpeg: a fixed quality ignored the
    setting and passed the shard, crop and subset tests."""
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    low, high = encode_jpeg(rgb, 30), encode_jpeg(rgb, 95)
    assert len(low) < len(high)
    errors = [np.abs(decode_jpeg(data).astype(int) - rgb).mean() for data in (low, high)]
    assert errors[0] > errors[1]
