import numpy as np
import pytest
import torch
from fastrlhf.data import TokenFile, random_batch, write_tokens


@pytest.mark.parametrize(
    "vocab,dtype", [(300, np.uint16), (65536, np.uint16), (65537, np.uint32), (100_277, np.uint32)]
)
def test_round_trip_and_dtype(tmp_path, vocab, dtype):
    ids = np.array([0, 1, vocab - 1, 17, vocab // 2])
    write_tokens(tmp_path / "t.bin", ids, vocab)
    tf = TokenFile(tmp_path / "t.bin")
    assert tf.tokens.dtype == dtype and tf.vocab_size == vocab and len(tf) == 5
    assert tf.tokens.tolist() == ids.tolist()
    assert (tmp_path / "t.bin").stat().st_size == 64 + 5 * np.dtype(dtype).itemsize


def test_bad_token_files(tmp_path):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\); got ids in \[0, 10\]"):
        write_tokens(tmp_path / "x.bin", [0, 10], 10)
    write_tokens(tmp_path / "t.bin", list(range(100)), 300)
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated or corrupted: 261 bytes, header says 264"):
        TokenFile(tmp_path / "t.bin")
    (tmp_path / "t.bin").write_bytes(b"not a token file at all" * 4)
    with pytest.raises(ValueError, match="not a fastrlhf token file"):
        TokenFile(tmp_path / "t.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TokenFile(tmp_path / "missing.bin")


def test_random_batch_shifts_and_repeats():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = random_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange: the target is the next token
    x2, _ = random_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x, y = random_batch(tokens[:17], 3, 16, torch.Generator())  # the only window that fits
    assert x[:, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="too short for block_size 16"):
        random_batch(tokens[:16], 1, 16, torch.Generator())
