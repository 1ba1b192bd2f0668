"""``sample``'s top-p keeps exactly the ids a full stable sort would keep (it sorts only the
most likely ones): checked against that plain statement, with ties."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from torchless.generation import sample


def full_sort_top_p(logits, rng, temperature, top_p):
    x = np.array(logits, np.float64) / temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cut = np.searchsorted(np.cumsum(probs[order]), top_p) + 1
    keep = np.zeros(probs.size, bool)
    keep[order[:cut]] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


@settings(max_examples=100, deadline=None)
@given(V=st.integers(2, 2000), scale=st.floats(0.05, 8), ties=st.booleans(),
       top_p=st.floats(0.001, 0.999), temperature=st.floats(0.2, 2.0),
       seed=st.integers(0, 2**32 - 1))
def test_top_p_equals_full_sort(V, scale, ties, top_p, temperature, seed):
    x = (np.random.default_rng(seed).standard_normal(V) * scale).astype(np.float32)
    if ties:
        x = np.round(x)
    got = sample(x, np.random.default_rng(seed + 1), temperature, top_p=top_p)
    assert got == full_sort_top_p(x, np.random.default_rng(seed + 1), temperature, top_p)
