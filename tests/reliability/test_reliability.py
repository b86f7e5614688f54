"""The short forms of the reliability scenarios (``make reliability`` runs the full ones): nothing lost."""

from __future__ import annotations

import pytest

from tests.amqp_vhost import private_amqp_url
from tests.reliability.common import Scenario, Settings
from tests.reliability.scenarios import SCENARIOS
from tests.services import require_rabbitmq

pytestmark = pytest.mark.realtime
__all__ = ["private_amqp_url"]  # the fixture, imported so this module's tests get a private vhost

QUICK = Settings(quick=True, soak_seconds=10.0)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.__name__ for s in SCENARIOS])
async def test_nothing_lost(scenario: Scenario, private_amqp_url: str) -> None:
    require_rabbitmq()
    row = await scenario(QUICK)
    print(f"{row.name} | {row.injected} | {row.sessions} | {row.lost} | {row.skipped or row.figures}")
    if row.skipped:
        pytest.skip(row.skipped)
    assert row.lost == 0, row.losses
