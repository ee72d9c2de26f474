"""The edge side of tests/test_partition.py, run inside the edge's network namespace: one EdgeClient, several
generations one after another, one JSON line per chunk on stdout, so the test sees each token as it arrives and
where it came from.

    python -m tests.partition_edge SERVER RUNS_JSON

RUNS_JSON is a list of {"name", "kw" (generate()'s keywords), "pause_after" (0: none), "pace_draft_s"}. With
`pause_after` N the edge stops reading its generation once N tokens have arrived, prints {"event": "pause"} and waits
for a line on stdin: the test cuts the link meanwhile, so the cut lands mid-generation whatever the speeds. The
session is idle while paused (the generation is pulled), so nothing is committed behind the test's back.
`pace_draft_s`: a pause after each draft-only chunk, a slow edge device, so that the draft does not spend the whole
budget while the link is down (a tiny draft makes thousands of tokens a second).
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from picospec.edge_client.client import EdgeClient, EdgeError, Generation
from picospec.shared.config import EdgeConfig
from picospec.shared.models import load_model


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def one_run(client: EdgeClient, prompt: list[int], run: dict[str, Any]) -> None:
    """One generation, a line per chunk, paused once after `pause_after` tokens; the end line has its results."""
    name, pause_after, pace = run["name"], run.get("pause_after", 0), run.get("pace_draft_s", 0.0)
    gen: Generation = client.generate(prompt, **run["kw"])
    say(run=name, event="start", t=time.time())
    try:
        async for tokens in gen:
            say(run=name, event="chunk", tokens=tokens, source=gen.last_chunk_source, t=time.time())
            if pause_after and len(gen.token_ids) >= pause_after:
                pause_after = 0
                say(run=name, event="pause", t=time.time())
                await asyncio.to_thread(sys.stdin.readline)
            if gen.last_chunk_source == "draft" and pace:
                await asyncio.sleep(pace)
    except EdgeError as e:
        say(run=name, event="error", error=str(e), t=time.time())
        return
    say(run=name, event="end", token_ids=gen.token_ids, spans=gen.draft_spans, stats=gen.stats.to_dict(),
        t=time.time())


async def main(server: str, runs: list[dict[str, Any]]) -> None:
    draft = load_model("tiny-random:layers=1", progress=False)
    prompt = list(draft.tokenizer("hello world")["input_ids"])
    config = EdgeConfig(server=server, draft=draft.name, peer_timeout_s=2.0, wait_ready_s=60.0, ignore_eos=True)
    async with EdgeClient(config, draft) as client:
        await client.connect()
        say(event="ready", t=time.time())
        for run in runs:
            await one_run(client, prompt, run)
    say(event="done", t=time.time())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
