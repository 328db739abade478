"""Generate tiny but valid GGUF language models (llama arch, byte-level gpt2 vocab) for tests."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile

import gguf
import numpy as np

logger = logging.getLogger(__name__)

ARCH = "llama"
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
MIN_FF = 128
CONTEXT_LENGTH = 2048
MIB = 1024 * 1024
MERGES = ["h e", "l l", "Ġ t", "t h", "i n", "e r", "o n", "a n"]
SPECIALS = ["<|bos|>", "<|eos|>"]
_F32 = 4


def _bytes_to_unicode() -> list[str]:
    """Return the GPT-2 byte->unicode table as a list indexed by byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _vocab() -> tuple[list[str], list[int], list[bool]]:
    """Return (tokens, token types, printable flags) for the tiny byte-level vocab."""
    byte_tokens = _bytes_to_unicode()
    tokens = byte_tokens + [m.replace(" ", "") for m in MERGES] + SPECIALS
    types = [int(gguf.TokenType.NORMAL)] * (len(tokens) - len(SPECIALS))
    types += [int(gguf.TokenType.CONTROL)] * len(SPECIALS)
    printable = [0x20 <= b < 0x7F for b in range(256)] + [True] * len(MERGES)
    printable += [False] * len(SPECIALS)
    return tokens, types, printable


def _fixed_bytes(n_vocab: int) -> int:
    """Return the tensor bytes that do not depend on the FFN width."""
    per_layer = 4 * N_EMBD * N_EMBD + 2 * N_EMBD
    return _F32 * (2 * n_vocab * N_EMBD + N_EMBD + N_LAYER * per_layer)


def _ffn_width(size_mb: float | None, n_vocab: int) -> int:
    """Return the FFN width that makes the file roughly size_mb MiB (never below MIN_FF)."""
    if size_mb is None:
        return MIN_FF
    overhead = 16 * 1024  # header, vocab strings and alignment padding, roughly
    free = size_mb * MIB - overhead - _fixed_bytes(n_vocab)
    width = int(free // (_F32 * 3 * N_EMBD * N_LAYER))
    if width < MIN_FF:
        logger.warning("size_mb=%s is below the minimum model size; writing the minimum", size_mb)
    return max(MIN_FF, width // 32 * 32)


def _tensors(rng: np.random.Generator, n_vocab: int, n_ff: int, printable: list[bool]) -> dict[str, np.ndarray]:
    """Return random llama weights; channel 0 is a constant 'bias' channel favouring printable tokens."""
    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embd = rand(n_vocab, N_EMBD, scale=1.0)
    embd[:, 0] = 4.0  # constant channel, never written by the residual branches below
    out = rand(n_vocab, N_EMBD, scale=0.3)
    out[:, 0] = np.where(np.array(printable), 2.0, -2.0)
    out[n_vocab - 1, 0] = 1.5  # eos: possible, but rarely the most likely token
    t: dict[str, np.ndarray] = {"token_embd.weight": embd}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        wo = rand(N_EMBD, N_EMBD, scale=0.1)
        down = rand(N_EMBD, n_ff, scale=0.1)
        wo[0, :] = 0.0
        down[0, :] = 0.0
        t[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        t[p + "attn_q.weight"] = rand(N_EMBD, N_EMBD, scale=0.1)
        t[p + "attn_k.weight"] = rand(N_EMBD, N_EMBD, scale=0.1)
        t[p + "attn_v.weight"] = rand(N_EMBD, N_EMBD, scale=0.1)
        t[p + "attn_output.weight"] = wo
        t[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        t[p + "ffn_gate.weight"] = rand(n_ff, N_EMBD, scale=0.1)
        t[p + "ffn_up.weight"] = rand(n_ff, N_EMBD, scale=0.1)
        t[p + "ffn_down.weight"] = down
    t["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    t["output.weight"] = out
    return t


def _write(path: pathlib.Path, seed: int, n_ff: int) -> None:
    """Write the complete GGUF model to path (not atomically)."""
    tokens, types, printable = _vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_name(f"tiny-gguf-seed{seed}")
    w.add_description("Random-weight tiny llama model for tests; output is nonsense.")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index(SPECIALS[0]))
    w.add_eos_token_id(tokens.index(SPECIALS[1]))
    w.add_add_bos_token(False)
    for name, arr in _tensors(np.random.default_rng(seed), n_vocab, n_ff, printable).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(path: str | os.PathLike[str], seed: int = 0, size_mb: float | None = None) -> pathlib.Path:
    """Atomically write a deterministic tiny GGUF model (about size_mb MiB if given) and return its path."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size_mb is not None and not 0 < size_mb < float("inf"):
        raise ValueError(f"size_mb must be a positive finite number, got {size_mb}")
    target = pathlib.Path(path)
    n_ff = _ffn_width(size_mb, len(_vocab()[0]))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        _write(pathlib.Path(tmp_name), seed, n_ff)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, target)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %s (seed=%d, n_ff=%d, %d bytes)", target, seed, n_ff, target.stat().st_size)
    return target


def write_unloadable_gguf(path: str | os.PathLike[str]) -> pathlib.Path:
    """Write a well-formed GGUF file whose architecture llama.cpp does not know: every header check
    passes, and loading it fails."""
    target = pathlib.Path(path)
    writer = gguf.GGUFWriter(str(target), "no-such-architecture")
    writer.add_tensor("t", np.zeros(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate command-line arguments."""
    parser = argparse.ArgumentParser(prog="python -m inference_worker.testing.tiny_gguf", description=__doc__)
    parser.add_argument("out", type=pathlib.Path, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=0, help="random seed (>= 0); different seeds give different files")
    parser.add_argument("--size-mb", type=float, default=None, help="approximate file size in MiB (> 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="enable info logging")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.size_mb is not None and not 0 < args.size_mb < float("inf"):
        parser.error(f"--size-mb must be a positive number, got {args.size_mb}")
    if not args.out.parent.is_dir():
        parser.error(f"output directory does not exist: {args.out.parent}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = write_tiny_gguf(args.out, seed=args.seed, size_mb=args.size_mb)
    except OSError as exc:
        logger.error("failed to write %s: %s", args.out, exc)
        return 1
    print(f"{out} {out.stat().st_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
