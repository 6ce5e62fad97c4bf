"""Measure summary quality on the evaluation set, per model.

For each document in tests/eval/facts.toml it reports, for the model's first summary
("raw") and for the summary famulus stores after the grounding check ("stored"):
  - whether it has an unsupported claim (a number, date, name or quote not in the source),
  - the share of the document's key facts it mentions,
  - its length in words,
and which grounding path the stored summary took.

Run: .venv/bin/python bench/quality.py [--model PATH ...] [--max-new-tokens N]
Without --model it uses the registered default model. Prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from famulus.daemon.config import Config
from famulus.daemon.extract import extract_text
from famulus.daemon.grounding.claims import SourceIndex, check
from famulus.daemon.grounding.normalize import normalize_text
from famulus.daemon.grounding.policy import Action, ground
from famulus.daemon.model.registry import resolve
from famulus.daemon.model.summarize import (
    DEFAULT_PROMPTS,
    STRICT_PROMPTS,
    Budget,
    Summarizer,
)
from famulus.daemon.model.supervisor import ModelHost
from famulus.daemon.paths import user_paths

EVAL_DIR = Path(__file__).resolve().parent.parent / "tests" / "eval"


def load_eval_set() -> list[dict[str, Any]]:
    data = tomllib.loads((EVAL_DIR / "facts.toml").read_text(encoding="utf-8"))
    return [{"path": (EVAL_DIR / d["file"]).resolve(), "facts": d["facts"]}
            for d in data["document"]]


def fact_coverage(summary: str, facts: list[list[str]]) -> float:
    """Return the share of facts of which any accepted spelling occurs in the summary."""
    text = normalize_text(summary)
    found = sum(any(normalize_text(alt) in text for alt in fact) for fact in facts)
    return found / len(facts)


def evaluate_model(model_path: Path, config: Config) -> dict[str, Any]:
    cfg = config.model
    host = ModelHost({"path": str(model_path), "devices": list(cfg.devices), "cache_dir": "",
                      "npu_max_prompt_len": cfg.npu_max_prompt_len,
                      "npu_min_response_len": cfg.npu_min_response_len,
                      "load_timeout_s": cfg.load_timeout_s})
    budget = Budget(max_prompt_tokens=cfg.max_prompt_tokens, max_new_tokens=cfg.max_new_tokens,
                    repetition_penalty=cfg.repetition_penalty,
                    timeout_s=cfg.generation_timeout_s)
    rows = []
    started = time.monotonic()
    try:
        host.ensure_loaded()
        for doc in load_eval_set():
            source = extract_text(doc["path"], max_bytes=config.watch.max_file_bytes).text
            raw = Summarizer(host, budget, prompts=DEFAULT_PROMPTS).summarize(source).text
            stored = ground(source, raw,
                            lambda s=source: Summarizer(host, budget,
                                                        prompts=STRICT_PROMPTS).summarize(s).text,
                            action=Action(config.grounding.on_unsupported),
                            retry=config.grounding.retry,
                            extractive_sentences=config.grounding.extractive_sentences)
            index = SourceIndex(source)
            raw_report, stored_report = check(raw, index), check(stored.text, index)
            rows.append({
                "document": doc["path"].name,
                "raw": {"text": raw,
                        "unsupported": [c.text for c in raw_report.unsupported],
                        "coverage": round(fact_coverage(raw, doc["facts"]), 3),
                        "words": len(raw.split())},
                "stored": {"text": stored.text, "path": str(stored.path),
                           "grounded": stored.grounded,
                           "unsupported_left": [c.text for c in stored_report.unsupported],
                           "coverage": round(fact_coverage(stored.text, doc["facts"]), 3),
                           "words": len(stored.text.split())},
            })
            print(f"{doc['path'].name}: raw unsupported={len(raw_report.unsupported)} "
                  f"stored path={stored.path}", file=sys.stderr, flush=True)
    finally:
        host.stop()
    return {"model": model_path.name, "device": host.state.device,
            "seconds": round(time.monotonic() - started, 1), "summary": aggregate(rows),
            "documents": rows}


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"documents": len(rows)}
    for stage, unsupported_key in (("raw", "unsupported"), ("stored", "unsupported_left")):
        out[stage] = {
            "share_with_unsupported_claim": round(
                sum(bool(r[stage][unsupported_key]) for r in rows) / len(rows), 3),
            "key_fact_coverage": round(statistics.mean(r[stage]["coverage"] for r in rows), 3),
            "median_words": statistics.median(r[stage]["words"] for r in rows),
        }
    out["stored_paths"] = dict(Counter(r["stored"]["path"] for r in rows))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", type=Path,
                        help="GGUF file or OpenVINO IR folder (repeatable); default: the "
                        "registered default model")
    parser.add_argument("--max-new-tokens", type=int, help="override model.max_new_tokens")
    parser.add_argument("--on-unsupported", choices=[a.value for a in Action],
                        help="override grounding.on_unsupported")
    args = parser.parse_args()
    config = Config()
    if args.max_new_tokens:
        config = replace(config, model=replace(config.model, max_new_tokens=args.max_new_tokens))
    if args.on_unsupported:
        config = replace(config, grounding=replace(config.grounding,
                                                   on_unsupported=args.on_unsupported))
    models = args.model or [resolve(user_paths().models_dir, config.model.name, "")]
    report = {"config": {"max_new_tokens": config.model.max_new_tokens,
                         "on_unsupported": config.grounding.on_unsupported,
                         "retry": config.grounding.retry},
              "models": [evaluate_model(m, config) for m in models]}
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
