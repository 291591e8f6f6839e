"""The checkpoint's own tokenizer, through the Rust `tokenizers` library (no transformers at run time).

Qwen2.5 tokenisation is a byte-level BPE with NFC normalisation and the Qwen2 split regex; the vision
placeholders are added special tokens, one id each. `tokenizer.json` holds all of it; older directories
that ship only `vocab.json` + `merges.txt` are rebuilt with the same pipeline as transformers'
`Qwen2Tokenizer`, with the added tokens read from `tokenizer_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from qwenvl_jax.processing.errors import InputError

PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _token_content(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.get("content")


class Tokenizer:
    """Encode/decode with a checkpoint's tokenizer; special-token names resolved from its config."""

    def __init__(
        self, backend, *, eos_token: str | None, pad_token: str | None, bos_token: str | None = None
    ):
        self._tok = backend
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        if (directory / "tokenizer.json").exists():
            backend = RustTokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            backend = _from_vocab_and_merges(directory, config)
        else:
            raise InputError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
        pad = _token_content(config.get("pad_token"))
        eos = _token_content(config.get("eos_token"))
        bos = _token_content(config.get("bos_token"))
        return cls(backend, eos_token=eos, pad_token=pad if pad is not None else eos, bos_token=bos)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise InputError(f"token {token!r} is not in this tokenizer's vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch_with_offsets(
        self, texts: Sequence[str]
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Ids with (start, end) character offsets into each text, for span-based label masks."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [(enc.ids, enc.offsets) for enc in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)


def _from_vocab_and_merges(directory: Path, config: dict):
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = RustTokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their ids from the config: insert them in id order so each lands on its own id.
    added = sorted(
        ((int(i), spec) for i, spec in config.get("added_tokens_decoder", {}).items()),
        key=lambda item: item[0],
    )
    for token_id, spec in added:
        token = AddedToken(
            spec["content"],
            special=spec.get("special", False),
            normalized=spec.get("normalized", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            single_word=spec.get("single_word", False),
        )
        if spec.get("special", False):
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        if tok.token_to_id(spec["content"]) != token_id:
            raise InputError(f"{directory}: added token {spec['content']!r} does not land on id {token_id}")
    return tok
