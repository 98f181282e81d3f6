"""aes: AES-256-CTR encryption and decryption of a message with pyaes (FunctionBench pyaes)."""
import random

import pyaes


def init(arg):
    rng = random.Random(2)
    key = bytes(rng.randrange(256) for _ in range(32))
    msg = bytes(rng.randrange(32, 127) for _ in range(12 << 10))
    return key, msg


def handler(state):
    key, msg = state
    ct = pyaes.AESModeOfOperationCTR(key, pyaes.Counter(1)).encrypt(msg)
    pt = pyaes.AESModeOfOperationCTR(key, pyaes.Counter(1)).decrypt(ct)
    assert pt == msg
    return ct
