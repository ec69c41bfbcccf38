"""The predictive policy's state, named once for the tests that compare two PredictiveCaches."""

# What serving sets: hot sets, touches, the clock (compared exactly)
SERVED = ("_hot", "_pending", "_hot_count", "capacity", "_touch", "_clock", "_resplit_out")
# What learning sets: the tables and their scales
LEARNED = (
    "_cross",
    "_cross_n",
    "_pair",
    "_pair_n",
    "_prev",
    "_prev_n",
    "_affinity",
    "_scale",
    "_prev_scale",
)
# What the hints' own learning sets
HINTS = ("_hint_hits", "_hint_guesses", "_hint_uses")
