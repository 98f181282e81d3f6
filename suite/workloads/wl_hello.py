"""hello world: no initialisation; the handler returns a constant."""


def init(arg):
    return None


def handler(state):
    return b"hello world"
