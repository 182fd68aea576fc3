"""The load benchmark's workload, after S-LoRA's evaluation (Sheng et al. 2023, §7): which adapter
each request asks for, when it arrives, and how long its prompt and its answer are.

* Popularity: adapter i (0-based) of n is asked for with probability p_i = (i + 1)^(-α) / Σ_j (j + 1)^(-α)
  (a power law; α = 1 is Zipf's law, α = 0 uniform).
* Arrivals: gaps between requests are Gamma(k, θ) with k = 1/cv² and θ = cv²/λ, so the mean gap is
  1/λ (λ requests per second) and the coefficient of variation is cv (cv = 1: a Poisson process;
  larger: burstier).
* Lengths: prompts and answer lengths from Alpaca (instruction and input through the tokenizer; the
  answer's token count as the output length), or uniform ranges of token counts (random ids).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ALPACA_FILE = Path("alpaca") / "alpaca_data.json"


@dataclass(frozen=True)
class WorkloadSpec:
    """What the trace looks like (every field is a command-line option of ``peftlab bench serve``)."""

    requests: int = 96
    rate: float = 4.0  # λ, requests per second
    cv: float = 1.0  # coefficient of variation of the gaps
    alpha: float = 1.0  # power-law exponent of adapter popularity
    lengths: str = "alpaca"  # "alpaca" or "uniform:P0-P1,O0-O1" (prompt and output token ranges)
    max_prompt_tokens: int = 128
    max_output_tokens: int = 32
    min_output_tokens: int = 4
    slo_s: float = 30.0  # deadline: arrival + slo_s
    seed: int = 0
    duration_s: float | None = None  # soak: arrivals until this time instead of a request count

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able data."""
        return asdict(self)


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace: its arrival (seconds from the start), adapter index (into the
    system's adapter list; None: the base model), prompt ids and answer length."""

    arrival_s: float
    adapter: int | None
    prompt_ids: list[int]
    max_tokens: int


def popularity(n: int, alpha: float) -> list[float]:
    """p_i = (i + 1)^(-α) / Σ_j (j + 1)^(-α), i = 0..n-1."""
    weights = [(i + 1) ** -alpha for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def arrival_times(count: int | None, rate: float, cv: float, rng: random.Random, duration_s: float | None = None) -> list[float]:
    """Arrival instants (from 0) with Gamma(1/cv², cv²/rate) gaps: ``count`` of them, or all those
    before ``duration_s``."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got rate={rate}, cv={cv}")
    shape, scale = 1.0 / cv**2, cv**2 / rate
    times, t = [], 0.0
    while (count is None or len(times) < count) and (duration_s is None or t < duration_s):
        times.append(t)
        t += rng.gammavariate(shape, scale)
    return times


def parse_uniform(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``"uniform:8-64,4-32"`` -> ((8, 64), (4, 32)): prompt and output token ranges (inclusive)."""
    try:
        kind, ranges = text.split(":")
        prompt, output = (tuple(int(x) for x in r.split("-")) for r in ranges.split(","))
        if kind != "uniform" or len(prompt) != 2 or len(output) != 2 or min(*prompt, *output) < 1 \
                or prompt[0] > prompt[1] or output[0] > output[1]:
            raise ValueError
    except ValueError:
        raise ValueError(f"lengths {text!r}: expected 'alpaca' or 'uniform:P0-P1,O0-O1' with 1 <= P0 <= P1 and "
                         "1 <= O0 <= O1 (token counts), e.g. uniform:8-64,4-32") from None
    return prompt, output  # type: ignore[return-value]


def alpaca_rows(data_dir: Path | None) -> list[dict[str, str]]:
    """Alpaca's rows (``instruction``, ``input``, ``output``) from ``<data>/alpaca/alpaca_data.json``."""
    if data_dir is None or not (data_dir / ALPACA_FILE).is_file():
        where = "no data directory found" if data_dir is None else f"{data_dir / ALPACA_FILE} is missing"
        raise FileNotFoundError(f"Alpaca data for --lengths alpaca: {where}; set PEFTLAB_DATA to the shared/data "
                                "folder or use --lengths uniform:8-64,4-32")
    return json.loads((data_dir / ALPACA_FILE).read_text())


def lengths_from_alpaca(spec: WorkloadSpec, tokenizer: Any, count: int, rng: random.Random,
                        data_dir: Path | None) -> list[tuple[list[int], int]]:
    """``count`` (prompt ids, output length) pairs from random Alpaca rows: the instruction and its
    input joined by a blank line, cut to ``max_prompt_tokens``; the answer's token count clipped to
    [``min_output_tokens``, ``max_output_tokens``]."""
    rows = alpaca_rows(data_dir)
    out = []
    for _ in range(count):
        row = rows[rng.randrange(len(rows))]
        text = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        prompt = list(tokenizer(text).input_ids)[: spec.max_prompt_tokens]
        answer = len(tokenizer(row["output"], add_special_tokens=False).input_ids)
        out.append((prompt, min(spec.max_output_tokens, max(spec.min_output_tokens, answer))))
    return out


def lengths_uniform(spec: WorkloadSpec, vocab_size: int, count: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """``count`` (random prompt ids, output length) pairs with lengths uniform in the spec's ranges."""
    (p0, p1), (o0, o1) = parse_uniform(spec.lengths)
    low = min(3, vocab_size - 1)  # above the usual special ids
    return [([rng.randrange(low, vocab_size) for _ in range(rng.randint(p0, p1))], rng.randint(o0, o1))
            for _ in range(count)]


def make_trace(spec: WorkloadSpec, n_adapters: int, tokenizer: Any, vocab_size: int,
               data_dir: Path | None = None) -> list[TraceRequest]:
    """The seeded trace: arrivals, a power-law adapter per request (``n_adapters`` 0: every request
    goes to the base model), prompts and output lengths. The same spec and seed give the same
    prompts and lengths whatever ``n_adapters`` is, so runs with different adapter counts compare."""
    times = arrival_times(None if spec.duration_s else spec.requests, spec.rate, spec.cv,
                          random.Random(f"arrivals-{spec.seed}"), spec.duration_s)
    length_rng = random.Random(f"lengths-{spec.seed}")
    if spec.lengths == "alpaca":
        pairs = lengths_from_alpaca(spec, tokenizer, len(times), length_rng, data_dir)
    else:
        pairs = lengths_uniform(spec, vocab_size, len(times), length_rng)
    adapter_rng = random.Random(f"adapters-{spec.seed}-{n_adapters}")
    choice = range(n_adapters)
    weights = popularity(n_adapters, spec.alpha) if n_adapters else []
    return [TraceRequest(t, adapter_rng.choices(choice, weights)[0] if n_adapters else None, prompt, max_tokens)
            for t, (prompt, max_tokens) in zip(times, pairs)]
