"""Content hashes of weight files and model folders, the parts of a model's fingerprint.

A file is hashed whole, or (``sample``: multi-gigabyte weights) as its size and 33 evenly
spaced 1 MiB chunks; a folder as its weight, config and tokenizer files, with the config
fields that only record where a model came from left out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: File hashes of this process by (path, size, mtime, inode, sample): a stage fingerprints
#: its models once per call, and the transcoder files alone are read in 1 MiB samples of
#: gigabytes. A file that changes gets another size or mtime and is hashed again.
_FILE_HASHES: dict[tuple[str, int, int, int, bool], str] = {}


def sha256_file(path: Path, sample: bool = False) -> str:
    """Hash a file; for very large weight files, hash size + evenly spaced 1 MiB chunks."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, sample)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = _hash_file(path, stat.st_size, sample)
    return _FILE_HASHES[key]


def _hash_file(path: Path, size: int, sample: bool) -> str:
    digest = hashlib.sha256()
    chunk = 1 << 20
    with open(path, "rb") as handle:
        if not sample or size <= 512 * chunk:
            for block in iter(lambda: handle.read(chunk), b""):
                digest.update(block)
        else:
            digest.update(str(size).encode())
            for i in range(33):
                handle.seek(min(size - chunk, i * (size // 32)))
                digest.update(handle.read(chunk))
    return digest.hexdigest()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".yaml")


_PATH_FIELDS = {
    "adapter_config.json": ("base_model_name_or_path",),
    "config.json": ("_name_or_path",),
}


def _file_identity(file: Path, sample: bool) -> str:
    if file.name in _PATH_FIELDS:
        config = json.loads(file.read_text())
        for key in _PATH_FIELDS[file.name]:
            config.pop(key, None)
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return sha256_file(file, sample=sample)


def dir_identity(path: Path, sample: bool) -> str:
    """Hash of a folder's weight, config and tokenizer files: their names and contents."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.suffix not in _WEIGHT_SUFFIXES or file.name.startswith("."):
            continue
        digest.update(str(file.relative_to(path)).encode())
        digest.update(_file_identity(file, sample).encode())
    return digest.hexdigest()
