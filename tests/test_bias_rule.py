"""The bias skip (streamer.rules.bias) with plain values."""

from __future__ import annotations

import pytest

from streamer.rules.bias import bias_time_order, biases_to_use


def test_the_first_biases_in_time_order_are_left_out() -> None:
    biases = [("d", 4.0), ("a", 1.0), ("c", 3.0), ("b", 2.0)]
    assert biases_to_use(biases, 2, order=lambda b: bias_time_order(b[1], b[0])) == [("c", 3.0), ("d", 4.0)]


def test_same_time_orders_by_name_and_unknown_time_comes_first() -> None:
    biases = [("20200924000003", 5.0), ("20200924000002", 5.0), ("20200924000009", None)]
    order = biases_to_use(biases, 0, order=lambda b: bias_time_order(b[1], b[0]))
    assert order == [("20200924000009", None), ("20200924000002", 5.0), ("20200924000003", 5.0)]


def test_skipping_more_than_there_are_leaves_none_and_a_negative_skip_is_refused() -> None:
    assert biases_to_use(["x", "y"], 5, order=str) == []
    with pytest.raises(ValueError, match="skip_first"):
        biases_to_use(["x"], -1, order=str)
