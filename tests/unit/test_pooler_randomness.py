"""The pooler's batched randomness (SCRAM nonces, md5 salts, cancel keys): a forked worker never
hands out what its parent or a sibling will."""

from __future__ import annotations

import os

from outpost.pooler.auth import _server_nonce, random4


def test_random4_gives_four_bytes_that_vary() -> None:
    draws = [random4() for _ in range(600)]  # more than one batch
    assert all(len(d) == 4 for d in draws)
    assert len(set(draws)) > 590  # 600 draws from 2**32: a repeat is rare, many are a bug


def test_a_forked_child_does_not_reuse_the_parents_batch() -> None:
    random4()
    _server_nonce()  # both batches now hold values the parent will hand out next
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, random4() + _server_nonce().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    parent = random4() + _server_nonce().encode()
    assert len(child) == len(parent) > 4
    assert child[:4] != parent[:4]
    assert child[4:] != parent[4:]
