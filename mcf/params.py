"""Typed, validated view of ``params.yaml``.

Every stage reads its section into a frozen dataclass through :func:`build`. Types, ranges, choices
and input paths are checked before any work starts, and the first problem is reported as one line
naming the dotted key (``params.yaml: mask_ratio: must be < 1.0, got 1.5``), because a typo found after
an hour of training is an hour lost.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import math
import re
import stat
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from mcf.io import holds_working_folder, resolved

T = TypeVar("T")
DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """A bad params value; ``str()`` is the one line shown to the user."""

    def __init__(self, key: str, message: str, file: str | Path | None = None) -> None:
        self.key, self.message, self.file = key, message, file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str | Path | None]]:
        """Rebuilt from its parts when pickled (a Dask worker's error reaching the client)."""
        return ParamsError, (self.key, self.message, self.file)

    def under(self, prefix: str, file: str | Path | None = None) -> ParamsError:
        """The same error with its key nested under ``prefix``."""
        key = ".".join(p for p in (prefix, self.key) if p)
        return ParamsError(key, self.message, file or self.file)


def param(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field with numeric bounds checked by :func:`build`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: default.copy(), metadata={"bounds": bounds})
    return dataclasses.field(default=default, metadata={"bounds": bounds})


# Off while :func:`load` checks the other stages' sections: their inputs may not be written yet.
_CHECK_PATHS: contextvars.ContextVar[bool] = contextvars.ContextVar("check_paths", default=True)


def checking_paths() -> bool:
    """Whether input paths count now: not while :func:`load` builds the sections of the other stages."""
    return _CHECK_PATHS.get()


def require_path(path: str | Path, key: str, made_by: str | None = None) -> None:
    """Raise a :class:`ParamsError` naming ``key`` when an input path does not exist.

    ``made_by`` names the stage that writes it, for the hint (every missing input is exit 2).
    """
    if checking_paths() and not Path(path).exists():
        hint = f" (run `mcf {made_by}` first)" if made_by else ""
        raise ParamsError(key, f"path does not exist: {path}{hint}")


def require_apart(out: str, given: str, key: str, made_by: str) -> None:
    """Refuse an ``out`` folder that is the stage's input ``given`` (params ``key``): the input's own
    manifest.parquet passes as the sign of an earlier output, and the stage would replace its input."""
    if resolved(out) == resolved(given):
        raise ParamsError("out", f"is {key}, the {made_by} stage's output ({given}), which this stage would "
                          "replace; name another folder")


_BOUND_CHECKS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def require_below_cwd(folder: str | Path, key: str, why: str) -> None:
    """Refuse a folder a stage deletes whole that holds the working folder, as a params error naming
    ``key`` (before any work)."""
    if holds_working_folder(folder):
        raise ParamsError(key, f"{str(folder)!r} holds the working folder, and {why}; name a folder below it")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ParamsError as err:
                errors.append(err.message)
        raise ParamsError(key, " or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ParamsError(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ParamsError(key, f"expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParamsError(key, f"expected {len(args)} values, got {len(value)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(key, f"expected a number, got {type(value).__name__} {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer literal past 1.8e308
            digits = len(str(abs(value)))
            raise ParamsError(key, f"expected a finite number, got an integer of {digits} digits") from None
        if not math.isfinite(number):  # .nan passes no bound check, .inf most lower ones
            raise ParamsError(key, f"expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(key, f"expected a string, got {type(value).__name__} {value!r}")
        if value and not value.strip():  # no path or name: "  " was a folder named by two spaces
            raise ParamsError(key, f"{value!r} is only white space: an empty value (an unset variable?)")
        # YAML's "\0" and "\udc80" escapes: no file name holds them (os calls raise ValueError on a NUL,
        # pyarrow and OpenCV fail on a lone surrogate, after the work)
        if "\0" in value:
            raise ParamsError(key, f"{value!r} holds a NUL character, which no path or name may")
        if any("\ud800" <= c <= "\udfff" for c in value):
            raise ParamsError(key, f"{value!r} is not UTF-8 text (a lone surrogate escape)")
        return value
    raise TypeError(f"unsupported params annotation {tp!r} at {key}")


def build(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a params mapping, checking every field.

    Unknown keys are errors (a misspelt key would otherwise be silently ignored). ``__post_init__``
    may raise :class:`ParamsError` with a key relative to ``cls``; it is nested under ``prefix``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(prefix, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers too: sorted as text
    if unknown:
        key = ".".join(p for p in (prefix, str(unknown[0])) if p)
        raise ParamsError(key, f"unknown key (valid keys: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = ".".join(p for p in (prefix, name) if p)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(key, "missing required key")
            continue
        value = _convert(data[name], hints[name], key)
        if value == "" and isinstance(f.default, str) and f.default:  # a path or a name, never ""
            raise ParamsError(key, f"an empty value (an unset variable?): give one (default {f.default!r})")
        for bound, limit in f.metadata.get("bounds", {}).items():
            ok, sign = _BOUND_CHECKS[bound]
            if value is not None and not ok(value, limit):
                raise ParamsError(key, f"must be {sign} {limit}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ParamsError as err:
        raise err.under(prefix) from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error, with its line and column when PyYAML knows them."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"not valid YAML{where}: {problem}"


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading params.yaml as DVC (ruamel, YAML 1.2) does, where YAML 1.1 differs:
    ``1e-05``, which ``dvc exp run -S key=1e-5`` writes, is a number, not a string; ``010`` is ten, not
    eight; ``yes``, ``off`` and ``1:30`` are strings, not a bool or ninety. A key given twice is an
    error, not the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # SafeLoader's own error names it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FLOAT, _INT, _BOOL = (f"tag:yaml.org,2002:{name}" for name in ("float", "int", "bool"))
ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_FLOAT, _INT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_PREFIXED_INT = re.compile(r"^[-+]?0(?:b[01_]+|o[0-7_]+|x[0-9a-fA-F_]+)$")
ParamsLoader.add_implicit_resolver(
    _INT, re.compile(rf"{_PREFIXED_INT.pattern}|^[-+]?[0-9][0-9_]*$"), list("-+0123456789")
)


def _construct_int(loader: ParamsLoader, node: yaml.ScalarNode) -> int:
    """Decimal unless prefixed (``0b``, ``0o``, ``0x``): a leading zero does not make octal in YAML 1.2."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        return int(text, 0) if _PREFIXED_INT.match(text) else int(text, 10)
    except ValueError:  # past Python's 4300-digit limit on reading an integer
        raise yaml.constructor.ConstructorError(
            None, None, f"an integer of {len(text)} digits is too long to read", node.start_mark
        ) from None


ParamsLoader.add_constructor(_INT, _construct_int)
ParamsLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+  # 1e-05 (YAML 1.1: 1.0e-05)
        |[-+]?[0-9][0-9_]*\.[0-9_]*
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read a params file, failing with one clear line when it is missing or not a mapping."""
    if not str(path).strip():  # Path("") is ".", which read as "is a folder"; "  " as "not found", unseen
        raise ParamsError("", "an empty path (an unset variable?): give a params file (YAML)", f'"{path}"')
    path = Path(path)
    try:  # Path.is_dir() raises on a name too long or a folder this user may not enter: one stat, all caught
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise ParamsError("", "params file not found", path) from None
    except OSError as err:
        raise ParamsError("", f"cannot read it: {err.strerror}", path) from None
    if stat.S_ISDIR(mode):
        raise ParamsError("", "is a folder: give the params file (YAML) inside it", path)
    if not stat.S_ISREG(mode):  # a pipe (`--params <(...)`) reads once: torchrun's workers re-read the file
        raise ParamsError("", "not a regular file (a pipe or a device): give the params file itself", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ParamsError("", "not a UTF-8 text file (a params file is YAML)", path) from None
    except OSError as err:  # chmod 000, another user's file
        raise ParamsError("", f"cannot read it: {err.strerror}", path) from None
    try:
        data = yaml.load(text, Loader=ParamsLoader)
    except yaml.YAMLError as err:
        raise ParamsError("", yaml_problem(err), path) from None
    except RecursionError:  # PyYAML composes nested nodes recursively: thousands of brackets deep
        raise ParamsError("", "not valid YAML: nested too deeply to read", path) from None
    if not isinstance(data, dict):
        raise ParamsError("", "expected a mapping at the top level", path)
    return data


# Stage name -> "module:ConfigClass". The section of params.yaml with the same name is parsed into it.
SECTIONS: dict[str, str] = {
    "fetch": "mcf.data.fetch:FetchConfig",
    "crop": "mcf.data.crop:CropConfig",
    "subset": "mcf.data.subset:SubsetConfig",
    "teacher": "mcf.train.teacher:TeacherConfig",
    "pretrain": "mcf.train.pretrain:PretrainConfig",
    "finetune_alignment": "mcf.train.finetune:AlignmentConfig",
    "finetune_parsing": "mcf.train.finetune:ParsingConfig",
    "evaluate": "mcf.evaluate.evaluate:EvaluateConfig",
}


@dataclasses.dataclass(frozen=True)
class Common:
    """Top-level keys shared by several stages."""

    seed: int = param(0, ge=0, le=2**63 - 1)  # torch seeds are 64-bit, and training seeds seed + epoch
    mask_ratio: float = param(0.75, gt=0.0, lt=1.0)


def _check_outs_apart(outs: dict[str, str]) -> None:
    """Refuse two sections whose ``out`` folders are one, or one inside the other: each stage replaces its
    whole ``out``, so one would delete the other's output (an earlier output's sign, such as both
    fine-tunes' model.pt, passes for its own). DVC refuses such outs in dvc.yaml; ``mcf <stage>`` must too."""
    for name, out in outs.items():  # before the pairs: it holds every other out, named as the culprit
        require_below_cwd(out, f"{name}.out", "the stage replaces it whole")
    real = {name: resolved(out) for name, out in outs.items()}
    names = list(outs)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = real[first], real[second]
            if a == b:
                raise ParamsError(f"{second}.out", f"is {first}.out ({outs[first]}): each stage replaces its "
                                  "whole out folder, deleting the other's output; name another folder")
            if a in b.parents or b in a.parents:
                inner, outer = (second, first) if a in b.parents else (first, second)
                raise ParamsError(f"{inner}.out", f"is inside {outer}.out ({outs[outer]}), which that stage "
                                  "replaces whole, deleting this one's output; name a folder outside it")


# The trees fetch_synthetic writes under fetch.out, by the fine-tune that reads each
SYNTH_TREES = {"finetune_alignment": "aflw19", "finetune_parsing": "lapa"}


def _reads_synthface(sections: dict[str, Any], stage: str) -> bool:
    """Whether fine-tune ``stage`` reads the SynthFace tree that fetch (source synthetic) writes."""
    fetch, root = sections["fetch"], sections[stage].data.root
    return fetch.source == "synthetic" and resolved(root) == resolved(fetch.out) / SYNTH_TREES[stage]


def _check_across(sections: dict[str, Any], given: set[str]) -> None:
    """Keys of two sections that must agree, where a mismatch would surface only in the later stage, after
    the ones before it had run. A check that reads a section the file leaves out is skipped: the sections'
    defaults are no profile (AFLW-19's n_train is the paper's, its root SynthFace's), and a file written for
    another stage alone would be refused."""
    _check_fetched_roots(sections, given)
    _check_synthetic_split(sections, given)
    _check_synthetic_labels(sections, given)
    _check_teacher_layers(sections, given)
    _check_pretrained_backbone(sections, given)


def _check_fetched_roots(sections: dict[str, Any], given: set[str]) -> None:
    """A fine-tune data root inside fetch.out must be the SynthFace tree fetch writes there (fetch replaces
    its out whole): any other was found missing only in finetune, after every stage before it."""
    fetch = sections["fetch"]
    out = resolved(fetch.out)
    for stage, tree in SYNTH_TREES.items():
        root = sections[stage].data.root
        inside = resolved(root) == out or out in resolved(root).parents
        if stage not in given or not inside or _reads_synthface(sections, stage):
            continue
        writes = (f"SynthFace's tree is {Path(fetch.out) / tree}" if fetch.source == "synthetic"
                  else f"source {fetch.source} writes its images alone")
        raise ParamsError(f"{stage}.data.root", f"{root} is inside fetch.out ({fetch.out}), which fetch "
                          f"replaces whole and where {writes}: name the tree {stage} reads")


def _check_synthetic_split(sections: dict[str, Any], given: set[str]) -> None:
    """A fine-tune of fetch's SynthFace AFLW-19 tree splits it as fetch wrote it, fetch.synthetic.aflw.n_train
    training images: :func:`mcf.data.aflw19.check_written_split` finds another only in finetune."""
    stage = "finetune_alignment"
    if stage not in given or not _reads_synthface(sections, stage):
        return
    data, written = sections[stage].data, sections["fetch"].synthetic.aflw.n_train
    if data.n_train != written:
        raise ParamsError(f"{stage}.data.n_train", f"is {data.n_train}, but fetch.synthetic.aflw.n_train "
                          f"writes {written} training images into {data.root}: another split would test on "
                          "training images; set both to the same number")


def says_synthface(label: str) -> bool:
    """:func:`mcf.synth.writers.names_synthface`'s rule (tests/test_params.py holds them equal), not imported:
    every stage would then run mcf/synth, which only fetch and the SynthFace readers depend on in dvc.yaml."""
    return "synthface" in label.lower()


def _check_synthetic_labels(sections: dict[str, Any], given: set[str]) -> None:
    """Numbers of models fine-tuned on fetch's SynthFace tree are filed under a SynthFace label, which
    evaluate checked only after scoring, the last stage (:func:`mcf.evaluate.evaluate.check_label`)."""
    evaluate = sections["evaluate"]
    for stage in SYNTH_TREES:
        task = stage.removeprefix("finetune_")
        label = getattr(evaluate, f"{task}_label")
        scored = resolved(getattr(evaluate, task)) == resolved(sections[stage].out)
        if stage in given and scored and _reads_synthface(sections, stage) and not says_synthface(label):
            raise ParamsError(f"evaluate.{task}_label", f"{label!r} must contain 'SynthFace': "
                              f"evaluate.{task} scores {stage}, whose data.root is fetch's SynthFace tree "
                              f"({sections[stage].data.root})")


def _check_teacher_layers(sections: dict[str, Any], given: set[str]) -> None:
    """pretrain's feature layers are blocks of the teacher stage's export when pretrain.teacher names it;
    where that stage builds or checks its ViT at teacher.backbone's size (train, random, moco_v3:), a layer
    past its depth was found only in pretrain, after fetch, crop, subset and teacher (a timm name or an mcf:
    export folder brings its own depth)."""
    teacher, pretrain = sections["teacher"], sections["pretrain"]
    sized = teacher.source in ("train", "random") or teacher.source.startswith("moco_v3:")
    if not ("pretrain" in given and pretrain.model.uses_teacher and sized
            and resolved(pretrain.teacher) == resolved(teacher.out)):
        return
    depth = teacher.backbone.depth
    bad = [layer for layer in pretrain.model.feature_layers if layer >= depth]
    if bad:
        raise ParamsError("pretrain.model.feature_layers", f"{bad} out of range for teacher.backbone.depth "
                          f"{depth}: pretrain.teacher is the teacher stage's export ({pretrain.teacher}); "
                          f"name blocks in 0..{depth - 1}")


def _check_pretrained_backbone(sections: dict[str, Any], given: set[str]) -> None:
    """A fine-tune of pretrain's exports taps blocks of pretrain.model.backbone and cuts its input into that
    ViT's patches: a block past its depth, or an input size no whole number of patches (or under two), was
    found only as finetune built its model (:func:`mcf.train.finetune.build_model`), after pretraining."""
    pretrain = sections["pretrain"]
    out, vit = resolved(pretrain.out), pretrain.model.backbone
    for stage in ("finetune_alignment", "finetune_parsing"):
        cfg = sections[stage]
        if stage not in given or not (resolved(cfg.backbone) == out / "backbone"
                                      or resolved(cfg.scratch_backbone) == out / "backbone_init"):
            continue
        why = f"{stage} fine-tunes pretrain's exports ({pretrain.out})"
        if max(cfg.blocks) >= vit.depth:
            raise ParamsError(f"{stage}.blocks", f"{cfg.blocks} reach past pretrain.model.backbone.depth "
                              f"{vit.depth}: {why}; name blocks in 0..{vit.depth - 1}")
        size, patch = cfg.data.size, vit.patch_size
        if size % patch or size < 2 * patch:
            raise ParamsError(f"{stage}.data.size", f"must be a multiple of pretrain.model.backbone."
                              f"patch_size {patch}, at least two patches ({2 * patch}), got {size}: {why}")


def _config_class(stage: str) -> type:
    module, name = SECTIONS[stage].split(":")
    return getattr(importlib.import_module(module), name)


def load(
    stage: str | None = None, path: str | Path = DEFAULT_PARAMS, every_section: bool = False
) -> tuple[Common, Any]:
    """Validate the top-level keys and ``stage``'s section; return them as typed configs.

    ``every_section`` also builds the other sections (all but their input paths, which an earlier
    stage may still have to write), so a typo in ``evaluate`` fails ``mcf fetch`` instead of the last
    stage after days of training, and checks the keys of two sections that must agree; the stage commands
    ask for it. A section whose limits on a top-level key depend on its own values (pretrain's patch count
    on ``mask_ratio``) checks them in a ``check_common(common)`` method, called for every section built here.
    """
    data = read_yaml(path)
    try:
        common = build(Common, {k: data[k] for k in ("seed", "mask_ratio") if k in data})
        unknown = sorted(set(data) - set(SECTIONS) - {"seed", "mask_ratio"}, key=str)
        if unknown:
            valid = ", ".join(["seed", "mask_ratio", *SECTIONS])
            raise ParamsError(str(unknown[0]), f"unknown top-level key (valid: {valid})")
        token = _CHECK_PATHS.set(False)
        try:
            others = SECTIONS if every_section else ()
            built = [build(_config_class(other), data.get(other), other) for other in others]
        finally:
            _CHECK_PATHS.reset(token)
        config = build(_config_class(stage), data.get(stage), stage) if stage else None
        for section in [*built, config]:
            if hasattr(section, "check_common"):
                section.check_common(common)
        _check_outs_apart({name: section.out for name, section in zip(others, built, strict=True)})
        if every_section:
            _check_across(dict(zip(others, built, strict=True)), set(data))
    except ParamsError as err:
        raise err.under("", path) from None
    return common, config
