"""Stage ``subset``: deterministic picks, stratification, re-written shards and the data gate.

The crop output is built here directly (manifest + shards in the crop stage's schema), so these tests
need neither images nor detectors.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from conftest import contract_types

from mcf.cli import main as cli_main
from mcf.data.crop import crop_id
from mcf.data.shards import encode_jpeg, iter_encoded, shard_urls, write_shards
from mcf.data.subset import SubsetConfig, face_size_bins, pick, quotas, subset
from mcf.errors import StageError
from mcf.params import ParamsError, build
from mcf.validate.gate import run_gate

SIZE = 32
# face sizes of the kept crops: 50 below 32 px, 30 in [32, 48), 20 at 64 px or more
FACE_SIZES = [24.0] * 50 + [40.0] * 30 + [80.0] * 20


def make_crop_dir(root: Path, bad_size: int | None = None, nan_blur: bool = False) -> Path:
    """A crop output: kept crops in shards of 16 plus 10 rejected rows, in the crop manifest schema."""
    rng = np.random.default_rng(0)
    rows, samples = [], []
    for i, face_size in enumerate(FACE_SIZES + [10.0] * 10):
        kept = i < len(FACE_SIZES)
        cid = crop_id(f"img-{i:04d}", 0)
        rows.append({
            "crop_id": cid, "sample_id": f"img-{i:04d}", "face": 0, "status": "kept" if kept else "rejected",
            "reason": None if kept else "too_small", "detector": "table" if i % 2 else "haar",
            "box": [0.0, 0.0, face_size, face_size], "landmarks": None, "score": 1.0, "face_size": face_size,
            "blur": np.nan if nan_blur and i == 3 else 100.0 + i, "phash": f"{i:016x}",
        })  # fmt: skip
        if kept:
            side = bad_size if bad_size and i == 5 else SIZE
            rgb = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            samples.append((cid, encode_jpeg(rgb), {"crop_id": cid}))
    write_shards(samples, root / "shards", 16)
    manifest = pd.DataFrame(rows)
    kept_rows = manifest["status"] == "kept"
    manifest["shard"] = [f"crops-{i // 16:06d}.tar" if k else None for i, k in enumerate(kept_rows)]
    manifest["width"] = pd.array([SIZE if k else None for k in kept_rows], dtype="Int64")
    manifest["height"] = manifest["width"]
    manifest["mean"] = np.where(kept_rows, 127.0, np.nan)
    manifest["std"] = np.where(kept_rows, 70.0, np.nan)
    manifest.to_parquet(root / "manifest.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def crop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_crop_dir(tmp_path_factory.mktemp("crop"))


def _cfg(crop: Path, out: Path, **kw: object) -> SubsetConfig:
    return SubsetConfig(**({"input": str(crop), "out": str(out), "n": 20, "shard_size": 8} | kw))  # type: ignore[arg-type]


def _shard_bytes(out: Path) -> list[bytes]:
    return [Path(u).read_bytes() for u in shard_urls(out / "shards")]


def test_same_seed_same_subset_other_seed_another(crop_dir: Path, tmp_path: Path) -> None:
    first = subset(_cfg(crop_dir, tmp_path / "a"), seed=0)
    again = subset(_cfg(crop_dir, tmp_path / "b"), seed=0)
    other = subset(_cfg(crop_dir, tmp_path / "c"), seed=1)
    pd.testing.assert_frame_equal(first, again)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert set(first["crop_id"]) != set(other["crop_id"])
    assert len(first) == len(other) == 20 and first["crop_id"].is_unique
    crop = pd.read_parquet(crop_dir / "manifest.parquet")
    assert set(first["crop_id"]) <= set(crop.loc[crop["status"] == "kept", "crop_id"])


def test_shards_stream_the_chosen_crops_unchanged(crop_dir: Path, tmp_path: Path) -> None:
    manifest = subset(_cfg(crop_dir, tmp_path / "s"), seed=3)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.parquet", "shards"]
    urls = shard_urls(tmp_path / "s/shards")
    assert len(urls) == 3  # 20 crops in shards of 8
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == list(manifest["crop_id"])
    assert all(s["jpg"].shape == (SIZE, SIZE, 3) for s in samples)
    original = {key: jpeg for key, jpeg, _ in iter_encoded(shard_urls(crop_dir / "shards"))}
    assert all(original[key] == jpeg for key, jpeg, _ in iter_encoded(urls))  # copied, not re-encoded
    assert pd.read_parquet(tmp_path / "s/manifest.parquet")["shard"].tolist() == manifest["shard"].tolist()


def test_manifest_keeps_the_crop_manifests_types(crop_dir: Path, tmp_path: Path) -> None:
    # every subset row is kept, so `reason` is all null (and `landmarks` is in this crop manifest)
    subset(_cfg(crop_dir, tmp_path / "s", stratify="face_size_bin"), seed=0)
    schema = pq.read_schema(tmp_path / "s/manifest.parquet")
    documented = contract_types("crop: `manifest.parquet`") | {"face_size_bin": "string"}
    assert {name: str(schema.field(name).type) for name in schema.names} == documented


def test_stratified_pick_keeps_bin_proportions(crop_dir: Path, tmp_path: Path) -> None:
    """Also the row order docs/CONTRACTS.md gives: the crop stage's, as the shards hold them, not the
    strata's (picked bin by bin, "32-48" first)."""
    manifest = subset(_cfg(crop_dir, tmp_path / "s", stratify="face_size_bin"), seed=0)
    assert manifest["face_size_bin"].value_counts().to_dict() == {"<32": 10, "32-48": 6, ">=64": 4}
    chosen = set(manifest["crop_id"])
    crop_order = [c for c in pd.read_parquet(crop_dir / "manifest.parquet")["crop_id"] if c in chosen]
    assert manifest["crop_id"].tolist() == crop_order
    assert [key for key, _, _ in iter_encoded(shard_urls(tmp_path / "s/shards"))] == crop_order
    by_detector = subset(_cfg(crop_dir, tmp_path / "d", stratify="detector", n=10), seed=0)
    assert by_detector["detector"].value_counts().to_dict() == {"haar": 5, "table": 5}


def test_null_is_a_stratum_of_its_own() -> None:
    kept = pd.DataFrame({"crop_id": [f"c{i}" for i in range(10)], "tag": ["a"] * 4 + [None] * 3 + ["b"] * 3})
    assert sorted(pick(kept, 10, 0, "tag")) == list(range(10))
    picked = kept.loc[pick(kept, 5, 0, "tag"), "tag"].fillna("null")
    assert picked.value_counts().to_dict() == {"a": 2, "b": 2, "null": 1}  # quotas 2, 1.5, 1.5


def _largest_remainder(counts: list[int], n: int) -> list[int]:
    """The rule quotas() documents, by hand: floor shares, then one more each to the largest remainders,
    ties to the earlier group."""
    total = sum(counts)
    share = [c * n // total for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-(counts[i] * n % total), i))
    for i in order[: n - sum(share)]:
        share[i] += 1
    return share


def test_quotas_and_bins() -> None:
    assert quotas(pd.Series({"a": 5, "b": 3, "c": 2}), 5).to_dict() == {"a": 3, "b": 1, "c": 1}
    assert quotas(pd.Series({"a": 1, "b": 1, "c": 1}), 2).to_dict() == {"a": 1, "b": 1, "c": 0}
    # exact shares 4/3, 20, 8/3, 52/3, 4/3, 34/3: the 1/3 tie goes to the first group, though in floats
    # 34/3 - 11 comes out above 4/3 - 1
    assert quotas(pd.Series([2, 30, 4, 26, 2, 17]), 54).tolist() == [2, 20, 3, 17, 1, 11]
    counts = np.random.default_rng(0).integers(1, 4, 60)  # many groups, many tied remainders
    for n in (7, 30, 61, 100):
        assert quotas(pd.Series(counts), n).tolist() == _largest_remainder(counts.tolist(), n), n
    sizes = pd.Series([10.0, 32.0, 47.9, 48.0, 64.0, 500.0])
    assert face_size_bins(sizes, [32.0, 48.0, 64.0]).tolist() == [
        "<32",
        "32-48",
        "32-48",
        "48-64",
        ">=64",
        ">=64",
    ]
    with pytest.raises(ParamsError, match="subset.bins"):
        build(SubsetConfig, {"bins": [48.0, 32.0]}, "subset")


def test_bad_stratify_column_names_the_choices(crop_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"stratify: no column 'nope' \(valid: face_size_bin, crop_id"):
        subset(_cfg(crop_dir, tmp_path / "s", stratify="nope"), seed=0)
    assert not (tmp_path / "s").exists()


def test_a_bad_stratify_column_is_a_params_error_of_the_cli(crop_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Found only once the crop manifest is read, but a params value all the same: exit 2 naming the file
    and key, as every other bad value (it was exit 1, a stage failure)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"subset": {"input": str(crop_dir), "out": str(tmp_path / "s"),
                                                 "stratify": "nope"}}))
    assert cli_main(["subset", "--params", str(params)]) == 2
    assert f"mcf: invalid params: {params}: subset.stratify: no column 'nope'" in capsys.readouterr().err


def test_an_out_that_is_the_crop_output_is_refused(crop_dir: Path, tmp_path: Path) -> None:
    """The crop output holds manifest.parquet, the sign of an earlier subset, so ``subset.out`` naming the
    ``subset.input`` folder replaced the crop stage's output with the few crops picked from it."""
    before = (crop_dir / "manifest.parquet").read_bytes()
    for out in (crop_dir, crop_dir / "shards" / ".."):
        with pytest.raises(ParamsError, match=r"subset.out: is subset.input, the crop stage's output.*repl"):
            build(SubsetConfig, {"input": str(crop_dir), "out": str(out)}, "subset")
    assert (crop_dir / "manifest.parquet").read_bytes() == before


def test_list_column_is_refused_as_stratum(crop_dir: Path, tmp_path: Path) -> None:
    """A box or landmarks column holds arrays, which have no strata (groupby raised a bare TypeError)."""
    with pytest.raises(ParamsError, match=r"a column of lists 'box' \(valid: face_size_bin, crop_id") as err:
        subset(_cfg(crop_dir, tmp_path / "s", stratify="box"), seed=0)
    valid = str(err.value).split("(valid: ")[1]
    assert "box" not in valid and "detector" in valid
    assert not (tmp_path / "s").exists()


def test_a_stratum_column_of_more_values_than_n_is_refused(crop_dir: Path, tmp_path: Path) -> None:
    """`stratify: face_size` (or crop_id, a score): nearly every row a value of its own, so each quota
    rounded to 0 or 1 and the ties went to the earlier values: the n smallest faces, the same for every
    seed, with no word. More values than crops to pick is a params error naming the counts (here crop_id:
    this manifest's face sizes take 3 values)."""
    with pytest.raises(ParamsError, match=r"stratify: 'crop_id' has 100 values among the 100 kept crops, "
                       r"more than the n=12 to pick, so the pick would be its 12 smallest values whatever "
                       r"the seed"):
        subset(_cfg(crop_dir, tmp_path / "s", stratify="crop_id", n=12), seed=0)
    assert not (tmp_path / "s").exists()


def test_n_beyond_the_kept_crops_takes_them_all(
    crop_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mcf.data.subset"):
        manifest = subset(_cfg(crop_dir, tmp_path / "s", n=1000), seed=0)
    assert len(manifest) == len(FACE_SIZES) and "taking them all" in caplog.text


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_gate_rejects_a_crop_of_the_wrong_size(tmp_path: Path) -> None:
    crop = make_crop_dir(tmp_path / "crop", bad_size=SIZE - 3)
    with pytest.raises(StageError, match=r"(?s)gate 'subset' failed.*column=width_off\): 1 unexpected"):
        subset(_cfg(crop, tmp_path / "s", n=1000), seed=0)
    _assert_no_output(tmp_path / "s")


def test_gate_rejects_a_nan_in_the_manifest(tmp_path: Path) -> None:
    crop = make_crop_dir(tmp_path / "crop", nan_blur=True)
    with pytest.raises(StageError, match=r"expect_column_values_to_not_be_null\(column=blur\)"):
        subset(_cfg(crop, tmp_path / "s", n=1000), seed=0)
    _assert_no_output(tmp_path / "s")


def test_gate_fails_a_crop_the_crop_manifest_lacks(crop_dir: Path, tmp_path: Path) -> None:
    """Its size cannot be compared with the crop stage's (width_off is null): checked against another
    crop manifest (a wrong --params by hand), the gate fails instead of passing with nothing compared."""
    cfg = _cfg(crop_dir, tmp_path / "s")
    manifest = subset(cfg, seed=0)
    manifest.loc[2, "crop_id"] = "not_a_crop_of_this_run"
    with pytest.raises(StageError, match=r"not_be_null\(column=width_off\): 1 unexpected of 20"):
        run_gate(manifest, "subset", stage="validate", config=cfg, keep=False)


def test_cli_runs_the_stage_from_params(crop_dir: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    section = {"input": str(crop_dir), "out": str(tmp_path / "s"), "n": 12, "stratify": "face_size_bin"}
    params.write_text(yaml.safe_dump({"seed": 7, "subset": section}))
    assert cli_main(["subset", "--params", str(params)]) == 0
    assert len(pd.read_parquet(tmp_path / "s/manifest.parquet")) == 12
    by_hand = ["validate", "--params", str(params), "subset", str(tmp_path / "s/manifest.parquet")]
    assert cli_main(by_hand) == 0  # the gate by hand derives the columns the stage's gate did
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        yaml.safe_dump({"subset": {"input": str(tmp_path / "none"), "out": str(tmp_path / "t")}})
    )
    assert cli_main(["subset", "--params", str(missing)]) == 2  # an input missing, as for every stage


@pytest.mark.parametrize("stratify", [None, "tag"])
def test_the_pick_does_not_depend_on_the_manifest_row_order(stratify: str | None) -> None:
    """The module's promise: (manifest, seed, params) fix the pick, however the crop stage ordered rows."""
    kept = pd.DataFrame({"crop_id": [f"c{i:02d}" for i in range(40)], "tag": ["a", "b"] * 20})
    shuffled = kept.sample(frac=1.0, random_state=1)
    assert sorted(pick(kept, 12, 0, stratify)) == sorted(pick(shuffled, 12, 0, stratify))


@pytest.mark.parametrize("seed", range(5))
def test_strata_are_drawn_from_one_generator(seed: int) -> None:
    """One generator runs through the strata (pick's docstring): strata of one size do not all get the
    same positions, as a generator re-seeded for each would give them, picking in step."""
    kept = pd.DataFrame({"crop_id": [f"c{i:02d}" for i in range(40)], "tag": ["a", "b"] * 20})
    chosen = kept.loc[pick(kept, 10, seed, "tag")]
    a, b = (sorted(int(c[1:]) // 2 for c in chosen.loc[chosen["tag"] == tag, "crop_id"]) for tag in "ab")
    assert len(a) == len(b) == 5 and a != b


@pytest.mark.parametrize("damage", ["not parquet", "cut short", "no status column", "no shard column"])
def test_a_crop_manifest_the_stage_cannot_read_is_one_line(
    damage: str, crop_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The crop manifest subset.input names is read as the crop stage's gate passed it: one damaged since
    (not parquet, cut short) was pyarrow's ArrowInvalid traceback, one without a column a KeyError
    traceback. Each is exit 1 on one line naming the file and the stage that writes it; nothing written."""
    crop = tmp_path / "crop"
    crop.mkdir()
    (crop / "shards").symlink_to(crop_dir / "shards")
    path, data = crop / "manifest.parquet", (crop_dir / "manifest.parquet").read_bytes()
    if damage == "not parquet":
        path.write_text("crop_id,status\n")
    elif damage == "cut short":
        path.write_bytes(data[: len(data) // 2])
    else:
        pd.read_parquet(crop_dir / "manifest.parquet").drop(columns=[damage.split()[1]]).to_parquet(path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"subset": {"input": str(crop), "out": str(tmp_path / "s"), "n": 5}}))
    assert cli_main(["subset", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mcf subset: {path}: ") and err.count("\n") == 1, err
    assert err.rstrip().endswith("rerun `mcf crop`"), err
    _assert_no_output(tmp_path / "s")


def test_a_shard_the_crop_manifest_names_but_is_gone_is_named_before_any_copy(
    crop_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crop shard deleted since the crop stage was found only by the data gate, after every crop had
    been copied (an hour at the paper's 20M), as chosen crops "not written", naming no shard. Now it is
    exit 1 on one line naming the shard and the stage to rerun; nothing written."""
    crop = tmp_path / "crop"
    (crop / "shards").mkdir(parents=True)
    (crop / "manifest.parquet").write_bytes((crop_dir / "manifest.parquet").read_bytes())
    for shard in sorted((crop_dir / "shards").glob("crops-*.tar"))[1:]:
        (crop / "shards" / shard.name).symlink_to(shard)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"subset": {"input": str(crop), "out": str(tmp_path / "s"), "n": 100}}))
    assert cli_main(["subset", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "crops-000000.tar" in err and str(crop / "shards") in err, err
    assert err.rstrip().endswith("rerun `mcf crop`"), err
    _assert_no_output(tmp_path / "s")


def test_only_the_shards_that_hold_a_chosen_crop_are_read(crop_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A small subset of a large crop output reads the shards its crops are in, not every kept crop."""
    from mcf.data import subset as subset_mod

    read: list[str] = []

    def spy(urls: list[str]):  # the real reader, recording which shards it was given
        read.extend(urls)
        return iter_encoded(urls)

    monkeypatch.setattr(subset_mod, "iter_encoded", spy)
    crops = pd.read_parquet(crop_dir / "manifest.parquet").set_index("crop_id")["shard"]
    manifest = subset(_cfg(crop_dir, tmp_path / "s", n=3), seed=0)
    expected = sorted({str(crop_dir / "shards" / crops[cid]) for cid in manifest["crop_id"]})
    assert read == expected and len(read) < len(list((crop_dir / "shards").glob("*.tar")))


def test_copying_the_crops_shows_progress(crop_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """subset reads every kept crop to copy the chosen ones: an hour or more at the paper's 20M (about
    0.3 ms a crop here) with no bar."""
    from mcf.data import subset as subset_mod

    monkeypatch.setattr(subset_mod, "tqdm", functools.partial(subset_mod.tqdm, disable=False))
    subset(_cfg(crop_dir, tmp_path / "out"), seed=0)
    assert "copy crops: 100%|██████████| 20/20 " in capsys.readouterr().err
