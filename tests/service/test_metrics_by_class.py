"""The token counters are labelled by the length class predicted for each sample, the same
label as the length histogram, so speedup and acceptance read per class."""

from __future__ import annotations

from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = (
    "das_generated_tokens_total",
    "das_forward_passes_total",
    "das_drafted_tokens_total",
    "das_accepted_tokens_total",
)


def by_class(text: str) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "length_class" in sample.labels:
                values[sample.name][sample.labels["length_class"]] = sample.value
    return values


def test_token_counters_carry_the_predicted_length_class(client: httpx.Client) -> None:
    body = {"prompt": "per class", "max_tokens": 40, "seed": 3, "n": 2}
    for _ in range(3):  # the first has no history (unknown), the repeats one (short)
        assert client.post("/v1/completions", json=body).status_code == 200
    values = by_class(client.get("/metrics").text)
    lengths = values["das_generation_length_tokens_sum"]
    assert {"unknown", "short"} <= set(lengths)
    for name in COUNTERS:
        assert set(values[name]) == set(lengths), name
    assert values["das_generated_tokens_total"] == lengths  # tokens counted once, by class
    assert values["das_accepted_tokens_total"]["short"] > 0  # the repeats reuse the history
    for klass in lengths:
        accepted = values["das_accepted_tokens_total"][klass]
        assert accepted <= values["das_drafted_tokens_total"][klass]
