"""The pre-training crop dataset: random access into the subset shards, with a resumable order.

The release streams crops with a shuffling loader, whose position cannot be saved. Here the order of
an epoch is a permutation drawn from ``(seed, epoch)`` and the flip of a crop from
``(seed, epoch, crop index)``, so the sample at any ``(epoch, position)`` is a pure function of the
seed. A resumed run rebuilds the same epoch and starts at the saved position; worker processes and
their RNGs play no part in what is read. Ranks read disjoint, equal-length strided slices of the same
permutation (``DistributedSampler``'s semantics).

The shards are indexed once (tar member offsets); when the whole subset fits in ``cache_mb`` at the
training resolution it is decoded once into a uint8 tensor, otherwise each crop is decoded on access.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from mcf.data.shards import decode_jpeg, file_members, iter_groups, member_key, open_shard, shard_urls
from mcf.errors import StageError
from mcf.io import read_table
from mcf.train.distributed import get_rank

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def index_shards(shard_dir: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The shard paths, and per crop's JPEG member (in shard order) its shard's position in them, byte
    offset and byte size.

    Arrays, not a Python tuple per crop: a DataLoader worker forked from the process that indexed the
    shards writes the reference count of every object it reads, so it copied the whole index (136 bytes
    a crop, 2.5 GiB at 20M) into each of a rank's workers at every epoch.
    """
    urls = shard_urls(shard_dir)
    shard, offset, size = array("i"), array("q"), array("q")
    # minutes at the paper's 20M crops; rank 0's bar alone, as in training
    quiet = {"disable": True} if get_rank() else {}
    for i, url in enumerate(tqdm(urls, desc="index shards", unit="shard", leave=False, **quiet)):
        for _, group in iter_groups(url, lambda _, info: info):  # as webdataset: c.seg.jpg is c's "seg.jpg"
            shard.append(i)
            offset.append(group["jpg"].offset_data)
            size.append(group["jpg"].size)
    check_manifest(shard_dir, urls, np.bincount(np.asarray(shard, dtype=np.int64), minlength=len(urls)))
    return urls, np.asarray(shard), np.asarray(offset), np.asarray(size)


def check_manifest(shard_dir: str | Path, urls: list[str], counts: np.ndarray) -> None:
    """Refuse shards that disagree with the ``manifest.parquet`` beside them (its ``shard`` column), which
    the stage that wrote them wrote last: each still a well-formed tar, a copy beside them (``crops-000000
    copy.tar``) was trained on twice, a shard a partial ``dvc pull`` left out was not missed, and zeros
    from a sample's first header on (a crash) end a tar cleanly. Shards without a manifest are not checked.
    """
    path = Path(shard_dir).parent / "manifest.parquet"
    if not path.is_file():
        return
    listed = read_table(path, ["shard"], "rerun the stage that wrote it", only=True)["shard"].value_counts()
    found = dict(zip((Path(u).name for u in urls), counts.tolist(), strict=True))
    for name in sorted(found.keys() | set(listed.index)):
        held, lists = found.get(name, 0), listed.get(name, 0)
        if held != lists:
            totals = f"{int(counts.sum())} crops in the shards, {int(listed.sum())} in the manifest"
            raise StageError(f"{shard_dir}: {name} holds {held} crops, the manifest lists {lists} "
                             f"({totals}): shards added, removed or damaged since they were written; rerun "
                             "the stage that wrote them")


def _crop_id_at(url: str, offset: int) -> str:
    """The crop_id of the member whose data starts at byte ``offset``: read from the shard again, for an
    error message, as the index keeps no name per crop."""
    with open_shard(url) as tar:
        for info in file_members(tar):
            if info.offset_data == offset:
                return member_key(info.name)[0]
    return f"at byte {offset}"  # the shard was rewritten since it was indexed


class CropDataset(Dataset):
    """The subset's crops as ``[3, S, S]`` uint8 tensors, resized to the backbone's input size."""

    def __init__(self, shard_dir: str | Path, img_size: int, cache_mb: int) -> None:
        self.urls, self.shard, self.offset, self.size = index_shards(shard_dir)
        if not len(self.shard):
            raise StageError(f"no .jpg crops in the shards of {shard_dir}; rerun the stage that wrote it")
        self.img_size = img_size
        self.cache: torch.Tensor | None = None
        if len(self) * 3 * img_size**2 <= cache_mb * 2**20:
            quiet = {"disable": True} if get_rank() else {}
            crops = tqdm(range(len(self)), desc="decode crops", unit="crop", leave=False, **quiet)
            self.cache = torch.stack([self._decode(i) for i in crops])
        where = "cached" if self.cache is not None else "on disk"
        log.info("%d crops in %s (%s)", len(self), shard_dir, where)

    def __len__(self) -> int:
        return len(self.shard)

    def _decode(self, index: int) -> torch.Tensor:
        url, offset, size = self.urls[self.shard[index]], int(self.offset[index]), int(self.size[index])
        try:
            with open(url, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except OSError as err:  # a worker's OSError reached the CLI as a traceback (torch drops its errno)
            raise StageError(f"{url}: not readable since the shards were indexed ({err.strerror or err}); "
                             "the subset must stay in place while it trains") from None
        try:
            rgb = decode_jpeg(data)
        except StageError as err:  # named by its crop_id, as the stages name a crop
            message = str(err).partition(": ")[2]
            raise StageError(f"crop {_crop_id_at(url, offset)} in {url}: {message}") from None
        if rgb.shape[:2] != (self.img_size, self.img_size):  # bilinear: the release's transforms.Resize
            image = Image.fromarray(rgb).resize((self.img_size, self.img_size), Image.BILINEAR)
            rgb = np.asarray(image)
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # [3, S, S]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.cache[index] if self.cache is not None else self._decode(index)


def steps_per_epoch(num_crops: int, batch_size: int, accum_steps: int, world_size: int) -> int:
    """Optimizer steps in one epoch: each rank's slice, in whole accumulation groups (tail dropped)."""
    return num_crops // world_size // (batch_size * accum_steps)


class EpochView(Dataset):
    """What one rank reads in one epoch, from ``start`` (a sample position within its slice) on.

    Items are normalised ``[3, S, S]`` float tensors: ImageNet mean/std, flipped or not as drawn.
    """

    def __init__(
        self, crops: CropDataset, seed: int, epoch: int, rank: int, world_size: int, length: int, start: int
    ) -> None:
        order = np.random.default_rng([seed, epoch]).permutation(len(crops))
        self.indices = order[rank::world_size][start:length]  # [length - start]
        self.flips = np.random.default_rng([seed, epoch, 1]).random(len(crops)) < 0.5  # keyed by crop
        self.crops = crops
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        index = int(self.indices[i])
        image = self.crops[index].float().div_(255)
        if self.flips[index]:
            image = image.flip(-1)
        return (image - self.mean) / self.std


def raised_as_in_workers(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches`` (a DataLoader's); a :class:`StageError` of a worker process comes out with its message.

    torch rebuilds a worker's exception from text that puts the worker's traceback before the message,
    so with ``num_workers`` the CLI printed a traceback for a damaged crop where one line names its shard.
    """
    try:
        yield from batches
    except StageError as err:
        text, head = str(err), f"\n{type(err).__module__}.{type(err).__qualname__}: "
        if not text.startswith("Caught ") or head not in text:  # raised in this process: as it is
            raise
        raise type(err)(text.rpartition(head)[2].rstrip("\n")) from None
