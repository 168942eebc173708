"""The masker of new rules is built in a worker thread as soon as they are installed (at
start and on every reload), not on the event loop in the first flow; a flow that comes
before it is ready waits for it; a build that fails refuses the flow (fail closed)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from addons.config.holder import RulesHolder
from addons.config.loader import load_rules
from addons.masking.addon import Masking
from addons.masking.masker import Masker
from tests.masking.test_addon import chat, flow

RULES = "upstreams:\n  - {name: openai, hosts: [api.openai.com], dialect: openai}\n"


class Recording(Masking):
    """Masking that notes which thread built each masker (and can be made to fail)."""

    def __init__(self, holder: RulesHolder, fail: bool = False) -> None:
        self.built_on: list[int] = []
        self.fail = fail
        super().__init__(holder)

    def _build(self, cfg) -> Masker:
        self.built_on.append(threading.get_ident())
        if self.fail:
            raise RuntimeError("detectors cannot be built")
        return super()._build(cfg)


def rules(tmp_path: Path, extra: str = ""):
    (tmp_path / "rules.yaml").write_text(RULES + extra)
    return load_rules(tmp_path)


def test_built_off_the_loop_at_start_and_on_reload(tmp_path: Path) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        holder = RulesHolder()
        m = Recording(holder)
        holder.install(rules(tmp_path))
        assert m._warming is not None
        first = await m._ready_masker()
        assert m.built_on and m.built_on[0] != loop_thread
        assert m.masker() is first and len(m.built_on) == 1  # not built again
        f = flow("openai", chat("mail jane.doe@example.com"))
        await m.request(f)
        assert f.response is None and b"jane.doe" not in f.request.content
        holder.install(rules(tmp_path,
                             "masking:\n  default_strategy: redact\n"))
        second = await m._ready_masker()
        assert second is not first and m.masker() is second
        assert len(m.built_on) == 2 and loop_thread not in m.built_on
    asyncio.run(main())


def test_without_a_loop_it_is_built_on_first_use(tmp_path: Path) -> None:
    m = Recording(RulesHolder(rules(tmp_path)))
    assert m._warming is None and m.built_on == []
    assert m.masker() is m.masker() and len(m.built_on) == 1


def test_a_failed_build_refuses_the_flow(tmp_path: Path) -> None:
    async def main() -> None:
        holder = RulesHolder()
        m = Recording(holder, fail=True)
        holder.install(rules(tmp_path))
        f = flow("openai", chat("mail jane.doe@example.com"))
        await m.request(f)
        assert f.response is not None and f.response.status_code >= 500
    asyncio.run(main())
