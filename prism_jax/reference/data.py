"""Training, calibration and held-out text of the reference model: the King James Bible.

The text comes from the Debian package `bible-kjv-text` (public domain; see
prism_jax/data/TEXT_SOURCE.md). One document is one chapter: a header line such as
"Genesis 1" followed by its verses, one per line, without verse numbers. Documents are
separated by one blank line. Chapters are split by their position in the book order, so
the three splits share no chapter:

  eval         chapters whose index (0-based, Genesis 1 = 0) is 10 modulo 20
  calibration  chapters whose index is 15 modulo 20
  train        every other chapter
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import lzma
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Split = Literal["train", "calibration", "eval"]
SPLITS: tuple[Split, ...] = ("train", "calibration", "eval")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TEXT_DIR = DATA_DIR / "text"
# The training split is the largest, so it ships with the stronger xz compression.
SPLIT_FILES: dict[Split, str] = {
    "train": "train.txt.xz",
    "calibration": "calibration.txt.gz",
    "eval": "eval.txt.gz",
}
DOCUMENT_SEPARATOR = "\n\n"
SPLIT_PERIOD = 20
EVAL_RESIDUE = 10
CALIBRATION_RESIDUE = 15

# The `bible` reader of Debian's bible-kjv package prints the whole text for this range.
WHOLE_BIBLE = "gen1:1-rev22:21"
_HEADER = re.compile(r"^(\S.*) (\d+)$")
_VERSE = re.compile(r"^\s+(\d+) (.*)$")


@dataclasses.dataclass(frozen=True)
class Chapter:
  """One chapter: book name, chapter number and verse texts in order."""

  book: str
  number: int
  verses: tuple[str, ...]

  def to_text(self) -> str:
    return "\n".join((f"{self.book} {self.number}",) + self.verses)


def split_of(index: int) -> Split:
  """Return the split of the chapter at `index` (0-based, in book order)."""
  residue = index % SPLIT_PERIOD
  if residue == EVAL_RESIDUE:
    return "eval"
  if residue == CALIBRATION_RESIDUE:
    return "calibration"
  return "train"


def parse_bible_output(text: str) -> list[Chapter]:
  """Parse the output of `bible -l10000 gen1:1-rev22:21` into chapters.

  The reader prints a header line "<Book> <chapter>", then one line per verse, indented
  and starting with the verse number; blank lines separate chapters.
  """
  chapters: list[Chapter] = []
  book, number, verses = None, 0, []
  for line in text.splitlines():
    if not line.strip():
      continue
    verse = _VERSE.match(line)
    if verse:
      if book is None:
        raise ValueError(f"verse line before any chapter header: {line[:60]!r}")
      verses.append(verse.group(2).strip())
      continue
    header = _HEADER.match(line)
    if not header:
      raise ValueError(f"unexpected line in the bible reader output: {line[:60]!r}")
    if book is not None:
      chapters.append(Chapter(book, number, tuple(verses)))
    book, number, verses = header.group(1), int(header.group(2)), []
  if book is not None:
    chapters.append(Chapter(book, number, tuple(verses)))
  return chapters


def read_debian_bible(reader: str = "bible") -> list[Chapter]:
  """Read every chapter with the `bible` program of the Debian packages bible-kjv and bible-kjv-text."""
  if shutil.which(reader) is None:
    raise FileNotFoundError(f"the program {reader!r} is not installed; run "
                            "`apt-get install bible-kjv-text` (it installs bible-kjv too)")
  result = subprocess.run([reader, "-l10000", WHOLE_BIBLE], capture_output=True, text=True, check=True)
  chapters = parse_bible_output(result.stdout)
  # 1,189 chapters in the 66 books of the King James Version.
  if len(chapters) != 1189:
    raise ValueError(f"expected 1189 chapters from {reader!r}, got {len(chapters)}; the package may be damaged")
  return chapters


def split_chapters(chapters: list[Chapter]) -> dict[Split, list[Chapter]]:
  """Assign every chapter to one split by its index (see the module docstring)."""
  splits: dict[Split, list[Chapter]] = {name: [] for name in SPLITS}
  for index, chapter in enumerate(chapters):
    splits[split_of(index)].append(chapter)
  return splits


def join_documents(documents: list[str]) -> str:
  return DOCUMENT_SEPARATOR.join(documents) + "\n"


def split_documents(text: str) -> list[str]:
  """Split a text into documents at blank lines, stripping each and dropping empty ones."""
  return [doc.strip() for doc in re.split(r"\n\s*\n", text) if doc.strip()]


def write_splits(chapters: list[Chapter], out_dir: Path = TEXT_DIR) -> dict[Split, Path]:
  """Write the three splits, compressed, to `out_dir`; returns the path of each."""
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {}
  for name, members in split_chapters(chapters).items():
    data = join_documents([chapter.to_text() for chapter in members]).encode()
    path = out_dir / SPLIT_FILES[name]
    if path.suffix == ".xz":
      path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    else:
      # mtime=0 keeps the file identical from one run to the next.
      path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    logger.info("wrote %s: %d chapters, %d characters", path, len(members), len(data))
    paths[name] = path
  return paths


def _read_compressed(path: Path) -> str:
  data = path.read_bytes()
  if path.suffix == ".xz":
    return lzma.decompress(data).decode()
  if path.suffix == ".gz":
    return gzip.decompress(data).decode()
  return data.decode()


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown text split {split!r}; expected one of {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=None)
def default_text(split: Split) -> str:
  """Decompress and return the text of one shipped split: "train", "calibration" or "eval"."""
  _check_split(split)
  path = TEXT_DIR / SPLIT_FILES[split]
  if not path.is_file():
    raise FileNotFoundError(f"shipped text {path} is missing; rebuild it with "
                            "`prism train-reference --prepare-text` (needs the Debian package bible-kjv-text)")
  return _read_compressed(path)


@functools.lru_cache(maxsize=None)
def default_text_file(split: Split) -> Path:
  """Write a decompressed temporary copy of one shipped split and return its path, for tools that read files."""
  text = default_text(split)
  folder = Path(tempfile.mkdtemp(prefix="prism-text-"))
  path = folder / f"kjv-{split}.txt"
  path.write_text(text)
  return path


def read_text(path: str | Path) -> str:
  """Read a text file, decompressing `.gz` and `.xz` files."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"text file {path} not found")
  return _read_compressed(path)
