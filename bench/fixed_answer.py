"""The real ranking service with every Recommend answered by the bytes of its first answer:
the benchmark's rung between the grpcio echo and the real handlers.

What is left of a call is what every Recommend pays before and after the ranking: the
asyncio server, the interceptors, parsing the request and sending a real 10-item
response. `make bench` runs it beside the real service (`Recommend (fixed answer)`), so a
run shows how much of the gap to the echo is the serving stack and how much the work.

`python -m bench.fixed_answer <the ranking service's arguments>`. The handler is replaced
when this module is imported, which is also how the worker processes (started with
`spawn`, which imports the main module again) get it.
"""

from __future__ import annotations

import sys
from typing import Any

from ranking_service import runner
from ranking_service.server import RankingServicer

_real = RankingServicer.Recommend
_answers: list[bytes] = []  # this process's first answer


async def _first_answer(self: RankingServicer, request: Any, context: Any) -> bytes:
    if not _answers:
        _answers.append(await _real(self, request, context))
    return _answers[0]


RankingServicer.Recommend = _first_answer  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(runner.main())
