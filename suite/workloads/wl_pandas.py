"""pandas: group-by aggregation over a 1e6-row DataFrame (numpy + pandas)."""
import numpy as np
import pandas as pd


def init(arg):
    n = 1_000_000
    rng = np.random.default_rng(7)
    cats = ["cat-%02d" % i for i in range(50)]
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64),
            "x": rng.standard_normal(n),
            "y": rng.integers(0, 1000, n),
            "cat": pd.Categorical.from_codes(rng.integers(0, len(cats), n), categories=cats),
        }
    )


def handler(df):
    sel = df[df["y"] < 900]
    agg = sel.groupby("cat", observed=True).agg(
        x_mean=("x", "mean"), x_sum=("x", "sum"), y_max=("y", "max"), n=("id", "count"))
    return agg.to_csv(float_format="%.6f").encode()
