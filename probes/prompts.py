"""Prompt sets: harmful / harmless / any instructions read from the common benchmark files.

`load_prompts(path)` recognises the format from the file itself:

| file | text column | category | rows kept |
| --- | --- | --- | --- |
| AdvBench `harmful_behaviors.csv` | `goal` | none | all |
| JailbreakBench `behaviors.csv`, `benign-behaviors.csv` | `Goal` (`goal` in the benign copy) | `Category` | all |
| HarmBench `harmbench_behaviors_text_*.csv` | `Behavior` | `SemanticCategory` | not contextual / copyright (1) |
| XSTest `xstest_prompts.csv` | `prompt` | `type` | all, or `kind="safe"` / `"unsafe"` by `label` |
| any other CSV | `instruction` or `prompt` (or `column=`) | `category` if present | all |
| `.txt` (MaliciousInstruct) | one instruction per line | none | non-blank lines |
| `.json`: list of `{"instruction", "category"}` (refusal_direction) or of strings | `instruction` | `category` | all |
| `.jsonl`: one such object or string per line | `instruction` | `category` | all |

(1) rows whose `FunctionalCategory` is `contextual` or `copyright` are skipped.

Column names are matched case-insensitively: the JailbreakBench benign copy here has a lower-cased header. Text is
stripped of surrounding whitespace (one XSTest prompt ends in a space), because a trailing space changes the tokens
a chat template produces. Duplicates are kept as in the file (refusal_direction `harmful_test.json` has 10, from
JailbreakBench and HarmBench overlapping); `PromptSet.dedupe()` drops them.

Every problem with a file raises `PromptFileError` (a `ValueError`) naming the file and what is wrong; a missing file
raises `MissingPromptFile`, which is both a `PromptFileError` and a `FileNotFoundError`.

Shared benchmark files live outside the repository: `shared_data_dir()` finds them (`$PROBES_SHARED_DATA`, else
`<repo>/../shared/data`). `builtin("harmful")` / `builtin("harmless")` are 24-prompt demo sets shipped with the
package, mild and clearly hypothetical, for examples and tests that must not depend on the shared folder.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources

__all__ = [
    "PromptSet",
    "PromptFileError",
    "MissingPromptFile",
    "load_prompts",
    "builtin",
    "BUILTIN_NAMES",
    "shared_data_dir",
]

SHARED_DATA_ENV = "PROBES_SHARED_DATA"
BUILTIN_NAMES: tuple[str, ...] = ("harmful", "harmless")

# Text columns tried in this order when `column` is not given. "goal" comes before "behavior" because
# JailbreakBench has both and its `Behavior` is a two-word label, not the request.
_TEXT_COLUMNS: tuple[str, ...] = ("goal", "behavior", "prompt", "instruction")
_HARMBENCH_SKIPPED = frozenset({"contextual", "copyright"})
_XSTEST_KINDS = ("safe", "unsafe")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a prompt set; the message names the file and the problem."""


class MissingPromptFile(PromptFileError, FileNotFoundError):
    """The prompt file does not exist (catchable as `ValueError` or `FileNotFoundError`)."""


@dataclass
class PromptSet:
    """A named list of instructions with optional per-instruction categories.

    `categories` is None when the source has no categories, else a list as long as `instructions` (entries may be
    None). `source` is the file it came from, if any. Derived sets (`sample`, `split`, `filter`, ...) keep the
    source and say how they were derived in their name.
    """

    name: str
    instructions: list[str]
    categories: list[str | None] | None = None
    source: pathlib.Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.instructions = list(self.instructions)
        for i, text in enumerate(self.instructions):
            if not isinstance(text, str):
                raise TypeError(f"PromptSet {self.name!r}: instruction {i} is {type(text).__name__}, expected str")
        if self.categories is not None:
            self.categories = list(self.categories)
            if len(self.categories) != len(self.instructions):
                raise ValueError(f"PromptSet {self.name!r}: {len(self.categories)} categories for "
                                 f"{len(self.instructions)} instructions")

    def __len__(self) -> int:
        return len(self.instructions)

    def __iter__(self) -> Iterator[str]:
        return iter(self.instructions)

    def __getitem__(self, index: int) -> str:
        return self.instructions[index]

    def __repr__(self) -> str:
        named = {c for c in self.categories or () if c is not None}
        cats = f", {len(named)} categories" if named else ""
        return f"PromptSet({self.name!r}, {len(self)} instructions{cats})"

    def category(self, index: int) -> str | None:
        """The category of instruction `index` (None where the set has none)."""
        return None if self.categories is None else self.categories[index]

    def _take(self, indices: Sequence[int], name: str) -> PromptSet:
        cats = None if self.categories is None else [self.categories[i] for i in indices]
        return PromptSet(name, [self.instructions[i] for i in indices], cats, self.source)

    def sample(self, n: int, seed: int) -> PromptSet:
        """`n` distinct instructions drawn with `seed`, kept in their original order.

        Raises ValueError if `n` is negative or larger than the set.
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"cannot sample {n} from {self.name!r}, which has {len(self)} instructions")
        picked = sorted(random.Random(seed).sample(range(len(self)), n))
        return self._take(picked, f"{self.name}[sample {n}, seed {seed}]")

    def split(self, parts: Sequence[float] | Sequence[int], seed: int) -> tuple[PromptSet, ...]:
        """Disjoint parts drawn from one seeded shuffle, each kept in the original order.

        `parts` is either sizes (ints; their sum may not exceed the set) or fractions (floats in [0, 1]; their sum
        may not exceed 1). Fractions are turned into sizes by rounding; when they sum to 1 the last part takes the
        rounding remainder, so every instruction lands in exactly one part. Parts are disjoint by position: equal
        strings that occur twice in the set can land in two parts (see `dedupe`).
        """
        sizes = self._sizes(parts)
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        out: list[PromptSet] = []
        start = 0
        for k, size in enumerate(sizes):
            chosen = sorted(order[start:start + size])
            out.append(self._take(chosen, f"{self.name}[split {k + 1}/{len(sizes)}, seed {seed}]"))
            start += size
        return tuple(out)

    def _sizes(self, parts: Sequence[float] | Sequence[int]) -> list[int]:
        parts = list(parts)
        if not parts:
            raise ValueError("split needs at least one size or fraction")
        if any(isinstance(p, bool) or not isinstance(p, (int, float)) for p in parts):
            raise ValueError(f"split parts must be all ints (sizes) or all floats (fractions), got {parts!r}")
        if all(isinstance(p, int) for p in parts):
            if any(p < 0 for p in parts) or sum(parts) > len(self):
                raise ValueError(f"split sizes {parts} do not fit in {self.name!r} ({len(self)} instructions)")
            return [int(p) for p in parts]
        if not all(isinstance(p, float) for p in parts):
            raise ValueError(f"split parts must be all ints (sizes) or all floats (fractions), got {parts!r}")
        total = sum(parts)
        if any(p < 0 or p > 1 for p in parts) or total > 1 + 1e-9:
            raise ValueError(f"split fractions {parts} must each lie in [0, 1] and sum to at most 1")
        sizes = [round(p * len(self)) for p in parts]
        if abs(total - 1) <= 1e-9:
            sizes[-1] = len(self) - sum(sizes[:-1])
        # Rounding up several parts can overshoot by a few; trim from the end so the sizes always fit.
        excess = sum(sizes) - len(self)
        for k in reversed(range(len(sizes))):
            if excess <= 0:
                break
            cut = min(excess, sizes[k])
            sizes[k] -= cut
            excess -= cut
        return sizes

    def filter(self, predicate: Callable[[str], bool] | None = None, *,
               categories: Iterable[str | None] | None = None, name: str | None = None) -> PromptSet:
        """The instructions for which `predicate(instruction)` is true and whose category is in `categories`.

        Either condition may be omitted. Filtering by category on a set without categories raises ValueError.
        The result may be empty.
        """
        wanted = None if categories is None else set(categories)
        if wanted is not None and self.categories is None:
            raise ValueError(f"{self.name!r} has no categories to filter on")
        keep = [i for i, text in enumerate(self.instructions)
                if (predicate is None or predicate(text))
                and (wanted is None or self.categories[i] in wanted)]  # type: ignore[index]
        return self._take(keep, name or f"{self.name}[filtered]")

    def dedupe(self) -> PromptSet:
        """The set without repeated instructions (first occurrence kept)."""
        seen: set[str] = set()
        keep = []
        for i, text in enumerate(self.instructions):
            if text not in seen:
                seen.add(text)
                keep.append(i)
        return self._take(keep, f"{self.name}[deduped]") if len(keep) < len(self) else self

    def head(self, n: int) -> PromptSet:
        """The first `n` instructions."""
        return self._take(list(range(min(n, len(self)))), f"{self.name}[:{n}]")

    def __add__(self, other: PromptSet) -> PromptSet:
        """Concatenation; categories are kept if either side has them (None fills the other side)."""
        if not isinstance(other, PromptSet):
            return NotImplemented
        if self.categories is None and other.categories is None:
            cats = None
        else:
            cats = (self.categories or [None] * len(self)) + (other.categories or [None] * len(other))
        return PromptSet(f"{self.name}+{other.name}", self.instructions + other.instructions, cats, None)


# ---------------------------------------------------------------------------------------------------- loading

def load_prompts(path: str | os.PathLike[str], *, column: str | None = None, kind: str | None = None,
                 limit: int | None = None, seed: int | None = None) -> PromptSet:
    """Read a prompt set, recognising the format from the file (see the module docstring).

    column: the text column (CSV) or key (JSON objects) to use instead of the detected one.
    kind:   keep only rows whose `label` column equals it (XSTest: "safe" or "unsafe").
    limit:  keep at most this many rows: the first ones, or a seeded sample (original order) if `seed` is given.
    seed:   with `limit`, sample instead of taking the head; without `limit`, it is ignored.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise MissingPromptFile(f"{p}: no such prompt file")
    if not p.is_file():
        raise PromptFileError(f"{p}: not a file")
    suffix = p.suffix.lower()
    if kind is not None and suffix != ".csv":
        raise PromptFileError(f"{p}: kind={kind!r} needs a CSV file with a label column")
    if suffix == ".csv":
        texts, cats = _read_csv(p, column, kind)
    elif suffix == ".txt":
        if column is not None:
            raise PromptFileError(f"{p}: column={column!r} does not apply to a one-instruction-per-line .txt file")
        texts, cats = _read_txt(p), None
    elif suffix == ".json":
        texts, cats = _read_records(p, _read_json_list(p), column)
    elif suffix == ".jsonl":
        texts, cats = _read_records(p, _read_jsonl(p), column)
    else:
        raise PromptFileError(f"{p}: unknown prompt file format {p.suffix!r} (expected .csv, .txt, .json or .jsonl)")
    if not texts:
        what = f" with label {kind!r}" if kind is not None else ""
        raise PromptFileError(f"{p}: no instructions{what} in the file")
    name = p.stem if kind is None else f"{p.stem}:{kind}"
    out = PromptSet(name, texts, cats, p)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        if limit < len(out):
            out = out.head(limit) if seed is None else out.sample(limit, seed)
    return out


def _read_text(p: pathlib.Path) -> str:
    try:
        # utf-8-sig: a BOM written by a spreadsheet would otherwise end up in the first column name.
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{p}: not UTF-8 text ({e})") from None


def _find_column(header: Sequence[str], wanted: str) -> str | None:
    if wanted in header:
        return wanted
    lowered = {h.lower(): h for h in header}
    return lowered.get(wanted.lower())


def _clean(p: pathlib.Path, text: str, where: str) -> str:
    text = text.strip()
    if not text:
        raise PromptFileError(f"{p}: {where}: empty instruction")
    return text


def _read_csv(p: pathlib.Path, column: str | None, kind: str | None) -> tuple[list[str], list[str | None] | None]:
    # newline="" as the csv module asks: quoted newlines survive, and the CRLF endings of the HarmBench test/val
    # copies (the "all" copy has LF) parse the same.
    reader = csv.DictReader(io.StringIO(_read_text(p), newline=""))
    header = list(reader.fieldnames or [])
    if not header:
        raise PromptFileError(f"{p}: empty CSV file (no header)")
    if column is not None:
        text_col = _find_column(header, column)
        if text_col is None:
            raise PromptFileError(f"{p}: no column {column!r}; columns are {header}")
    else:
        text_col = next((c for c in (_find_column(header, w) for w in _TEXT_COLUMNS) if c is not None), None)
        if text_col is None:
            raise PromptFileError(f"{p}: no instruction column; expected one of {list(_TEXT_COLUMNS)} "
                                  f"(or pass column=...), columns are {header}")
    functional = _find_column(header, "FunctionalCategory")  # HarmBench
    cat_col = (_find_column(header, "SemanticCategory") if functional else None) \
        or _find_column(header, "category") or _find_column(header, "type")
    label_col = _find_column(header, "label")
    if kind is not None and label_col is None:
        raise PromptFileError(f"{p}: kind={kind!r} needs a 'label' column; columns are {header}")
    texts: list[str] = []
    cats: list[str | None] = []
    labels: set[str] = set()
    for row_no, row in enumerate(reader, start=2):  # line 1 is the header
        if None in row:
            raise PromptFileError(f"{p}: row {row_no} has more fields than the header")
        if functional and (row[functional] or "").strip().lower() in _HARMBENCH_SKIPPED:
            # Contextual behaviours need their ContextString and copyright ones ask for song lyrics / book text:
            # neither is a standalone harmful instruction, so refusal work (Arditi et al.) drops both.
            continue
        if kind is not None:
            label = (row[label_col] or "").strip()  # type: ignore[index]
            labels.add(label)
            if label != kind:
                continue
        value = row[text_col]
        if value is None:
            raise PromptFileError(f"{p}: row {row_no} has no {text_col!r} field")
        texts.append(_clean(p, value, f"row {row_no}"))
        cats.append(((row[cat_col] or "").strip() or None) if cat_col else None)
    if kind is not None and not texts:
        raise PromptFileError(f"{p}: no rows with label {kind!r}; labels are {sorted(labels)}")
    return texts, (cats if cat_col else None)


def _read_txt(p: pathlib.Path) -> list[str]:
    # MaliciousInstruct has no trailing newline; blank lines (e.g. a final newline) are not instructions.
    return [line.strip() for line in _read_text(p).splitlines() if line.strip()]


def _read_json_list(p: pathlib.Path) -> list[object]:
    try:
        data = json.loads(_read_text(p))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise PromptFileError(f"{p}: unknown JSON layout: expected a list of strings or of "
                              f"{{'instruction': ..., 'category': ...}} objects, got a {type(data).__name__}")
    return data


def _read_jsonl(p: pathlib.Path) -> list[object]:
    items: list[object] = []
    for line_no, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{p}: line {line_no} is not valid JSON ({e})") from None
    return items


def _read_records(p: pathlib.Path, items: list[object],
                  column: str | None) -> tuple[list[str], list[str | None] | None]:
    key = column or "instruction"
    texts: list[str] = []
    cats: list[str | None] = []
    has_cats = False
    for i, item in enumerate(items):
        where = f"item {i}"
        if isinstance(item, str):
            if column is not None:
                raise PromptFileError(f"{p}: {where} is a string, but column={column!r} asks for objects")
            texts.append(_clean(p, item, where))
            cats.append(None)
        elif isinstance(item, dict):
            if key not in item:
                raise PromptFileError(f"{p}: {where} has no {key!r} key; keys are {sorted(item)}")
            text = item[key]
            if not isinstance(text, str):
                raise PromptFileError(f"{p}: {where}: {key!r} is {type(text).__name__}, expected str")
            cat = item.get("category")
            if cat is not None and not isinstance(cat, str):
                raise PromptFileError(f"{p}: {where}: 'category' is {type(cat).__name__}, expected str or null")
            has_cats = has_cats or "category" in item
            texts.append(_clean(p, text, where))
            cats.append(cat)
        else:
            raise PromptFileError(f"{p}: {where} is {type(item).__name__}, expected a string or an object "
                                  f"with {key!r}")
    return texts, (cats if has_cats else None)


# ---------------------------------------------------------------------------------------------------- builtins

def builtin(name: str) -> PromptSet:
    """A demo set shipped with the package: "harmful" or "harmless" (24 short instructions each, with categories).

    The harmful set is mild and clearly hypothetical (lock picking, phishing emails, exam cheating): enough to
    show a refusal direction in examples and tests without shipping a real benchmark.
    """
    key = name.removeprefix("demo_")
    if key not in BUILTIN_NAMES:
        raise ValueError(f"unknown builtin prompt set {name!r}; known: {list(BUILTIN_NAMES)}")
    res = resources.files("probes") / "data" / f"demo_{key}.json"
    with resources.as_file(res) as path:
        out = load_prompts(path)
    out.name = f"demo_{key}"
    return out


def default_sets(toy: bool, split: str = "test") -> dict[str, list[str]]:
    """{"harmful": [...], "harmless": [...]} for an experiment given no prompt files.

    The toy pair uses its own split (`test` = objects held out of fine-tuning); any other pair the built-in
    demo sets, so every experiment runs on a real pair without files.
    """
    if toy:
        from probes import toy as toy_pair

        return {kind: toy_pair.prompts(kind, split) for kind in ("harmful", "harmless")}
    return {kind: builtin(kind).instructions for kind in ("harmful", "harmless")}


# ---------------------------------------------------------------------------------------------------- shared data

def shared_data_dir() -> pathlib.Path:
    """The shared third-party data folder: `$PROBES_SHARED_DATA` if set, else `<repo root>/../shared/data`.

    Raises FileNotFoundError (saying where it looked and how to point elsewhere) if the folder is absent.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        path = pathlib.Path(env).expanduser()
        origin = f"${SHARED_DATA_ENV}"
    else:
        # probes/prompts.py -> repo root is two levels up; the shared folder sits beside the repository.
        path = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
        origin = "the default <repo root>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(f"shared data folder not found at {path} (from {origin}); "
                                f"set {SHARED_DATA_ENV} to the folder that holds prompts/ and tokenizers/")
    return path
