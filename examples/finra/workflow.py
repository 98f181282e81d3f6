"""FINRA-style trade audit (the MITOSIS paper's workflow case study).

fetch_portfolio and fetch_market_data load the state (generated
deterministically: a pandas frame of N trades and a dict of per-symbol
market data, about 50 bytes per trade); list_rules names the M audit
rules; audit runs one rule over the trades (every trade, or a window of
`window` trades when the input asks for one) against the market data;
merge combines the verdicts. Input: {"trades": N, "rules": M, "window": W,
"fail_rule": K (make rule K raise, for tests)}.
"""
import hashlib

import numpy as np
import pandas as pd

SYMBOLS = 4096


def fetch_portfolio(inp):
    n = int(inp.get("trades", 100000))
    rng = np.random.default_rng(20230710)
    return pd.DataFrame({
        "trade_id": np.arange(n, dtype=np.int64),
        "sym": rng.integers(0, SYMBOLS, n).astype(np.int32),
        "qty": rng.integers(1, 10000, n).astype(np.int64),
        "price": rng.random(n) * 500 + 1,
        "side": rng.integers(0, 2, n).astype(np.int8),
        "trader": rng.integers(0, 1000, n).astype(np.int32),
    })


def fetch_market_data(inp):
    rng = np.random.default_rng(7)
    last = rng.random(SYMBOLS) * 500 + 1
    vol = rng.integers(1000, 1000000, SYMBOLS)
    # Python objects, not one array: the shape market-data feeds arrive in.
    return {int(s): {"last": float(last[s]), "volume": int(vol[s]), "halted": bool(s % 97 == 0)}
            for s in range(SYMBOLS)}


def list_rules(inp):
    return [{"rule": k, "window": int(inp.get("window", 0)), "fail": k == inp.get("fail_rule")}
            for k in range(int(inp.get("rules", 8)))]


def _columns(market):
    syms = np.arange(SYMBOLS)
    last = np.array([market[s]["last"] for s in syms])
    volume = np.array([market[s]["volume"] for s in syms])
    halted = np.array([market[s]["halted"] for s in syms])
    return last, volume, halted


def audit(rule, portfolio, market):
    k = rule["rule"]
    if rule.get("fail"):
        raise ValueError("audit rule %d: market data for symbol %d is inconsistent" % (k, k))
    trades = portfolio
    w = rule.get("window") or 0
    if w:
        start = (k * w) % max(1, len(portfolio) - w + 1)
        trades = portfolio.iloc[start:start + w]
    last, volume, halted = _columns(market)
    sym = trades["sym"].to_numpy()
    kind = k % 4
    if kind == 0:    # price deviates from the market by more than a threshold
        dev = np.abs(trades["price"].to_numpy() - last[sym]) / last[sym]
        bad = dev > 3.0 + 0.5 * (k // 4)
    elif kind == 1:  # trade larger than a share of the day's volume
        bad = trades["qty"].to_numpy() > volume[sym] * (0.05 + 0.01 * (k // 4))
    elif kind == 2:  # trading a halted symbol
        bad = halted[sym] & (trades["side"].to_numpy() == (k // 4) % 2)
    else:            # a trader's notional on one symbol above a limit
        notional = trades["price"].to_numpy() * trades["qty"].to_numpy()
        bad = notional > 4.5e6 - 1e5 * (k // 4)
    ids = trades["trade_id"].to_numpy()[bad]
    return {"rule": k, "checked": int(len(trades)), "flagged": int(len(ids)),
            "digest": hashlib.sha256(ids.tobytes()).hexdigest()[:16]}


def merge(verdicts):
    verdicts = sorted(verdicts, key=lambda v: v["rule"])
    h = hashlib.sha256()
    for v in verdicts:
        h.update(("%d:%d:%s;" % (v["rule"], v["flagged"], v["digest"])).encode())
    return {"rules": len(verdicts), "flagged": sum(v["flagged"] for v in verdicts),
            "verdicts": verdicts, "digest": h.hexdigest()[:16]}
